"""Time to first token, PD versus colocated, split into its parts, on a real Mooncake store.

    python -m pdcluster.cluster.tools.bench_pd [--prompt-lens 128 512 1024 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

# Two engines in one process with their own store clients and segments: the prefill engine computes
# the prompt and writes its blocks (TTFT = compute + write); the decode engine reads them and computes
# the second token. The colocated baseline is the same prefill without the handoff, in the same run.


def _params():
    from ...engine import SamplingParams
    return SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def _run(engine, rid: str, ids: list[int], **kw):
    t0 = time.perf_counter()
    engine.add_request(rid, prompt_token_ids=ids, params=_params(), **kw)
    first = None
    outs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.append(out)
            first = first or time.perf_counter()
    return first - t0, time.perf_counter() - t0, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ...engine import LLM
    from ..kvstore.connector import make_connector
    from ..kvstore.master import MasterConfig, MooncakeMaster
    from ..spec import StoreSpec

    kw = dict(enable_prefix_caching=False, kv_cache_gib=0.5, max_num_batched_tokens=4096)
    prefill, decode, colocated = LLM(**kw).engine, LLM(**kw).engine, LLM(**kw).engine
    vocab = prefill.hf_config["vocab_size"]
    rng = random.Random(0)
    rows = []
    with MooncakeMaster(MasterConfig()) as master:
        spec = StoreSpec(rpc_port=master.config.rpc_port, metadata_port=master.config.metadata_port,
                         global_segment_mib=1024, local_buffer_mib=64)
        for eng in (prefill, decode):
            if make_connector(spec, eng) is None:
                raise SystemExit("store unreachable")
        _run(colocated, "warm", [5] * 32)
        for n in args.prompt_lens:
            samples = []
            for r in range(args.repeats):
                ids = [rng.randrange(100, vocab - 100) for _ in range(n)]
                co_ttft, _, _ = _run(colocated, f"co-{n}-{r}", ids)
                s0 = prefill.stats()
                pd_ttft, _, outs = _run(prefill, f"pd-{n}-{r}", ids, kv_export=True)
                s1 = prefill.stats()
                handoff = outs[-1].kv_handoff
                d0 = decode.stats()
                t0 = time.perf_counter()
                decode.add_request(f"pd-{n}-{r}", prompt_token_ids=ids, params=_params(),
                                   kv_import=handoff)
                while decode.has_unfinished_requests():
                    decode.step()
                second = time.perf_counter() - t0
                d1 = decode.stats()
                assert d1.kv_recomputed_tokens == d0.kv_recomputed_tokens, "blocks were not loaded"
                write = s1.kv_save_seconds - s0.kv_save_seconds
                read = d1.kv_load_seconds - d0.kv_load_seconds
                mb = (d1.kv_bytes_loaded - d0.kv_bytes_loaded) / 1e6
                samples.append((co_ttft, pd_ttft, pd_ttft - write, write, read, second, mb))
            rows.append((n, *[statistics.median(c) for c in zip(*samples)]))
    print(f"{'prompt':>6} {'KV MB':>7} {'coloc TTFT':>10} {'PD TTFT':>8} {'= compute':>9} "
          f"{'+ write':>8} {'read':>7} {'2nd tok':>8} {'PD/coloc':>8} {'write/compute':>13} "
          f"{'write GB/s':>10} {'read GB/s':>9}")
    for n, co, pd, comp, write, read, second, mb in rows:
        print(f"{n:>6} {mb:>7.1f} {co:>10.3f} {pd:>8.3f} {comp:>9.3f} {write:>8.3f} {read:>7.3f} "
              f"{second:>8.3f} {pd / co:>8.2f} {write / comp:>12.1%} {mb / 1e3 / write:>10.2f} "
              f"{mb / 1e3 / read:>9.2f}")
    print("seconds, medians of", args.repeats, "runs; PD TTFT = prefill compute + store write; "
          "'read' and '2nd tok' are on the decode engine (pull blocks, verify, compute token 2).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
