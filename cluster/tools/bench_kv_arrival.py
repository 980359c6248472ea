"""Inter-token latency of running streams while long prompts' KV arrives, with the KV moved inside
the engine's step (`engine.async_kv_transfer: false`) and off it (true), in one run; at engine level
also beside a control whose newcomers' KV is already in the cache (nothing moves), which prices what
a newcomer costs the batch by being decoded at all.

    python -m pdcluster.cluster.tools.bench_kv_arrival [--streams 4] [--arrivals 4] [--arrival-len 3072]
    python -m pdcluster.cluster.tools.bench_kv_arrival --served ...   # on the served PD cluster
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import statistics
import sys
import time

import httpx

from ..spec import ClusterSpec
from .bench_client import make_prompt, stream_completion, token_counter

# Engine level (default): a decode engine with one thread runs `--streams` sequences; handoffs of
# `--arrival-len`-token prompts, stored beforehand by a prefill engine in a real Mooncake store, are
# admitted one every few steps; each step's wall time is the running streams' inter-token latency.
# This isolates the decode worker (the transfer thread gets the machine's other core, as a transfer
# engine has its own on a real node). Served (`--served`), per deployment: `--streams` long greedy streams start and decode alone for `--quiet-s` (the
# baseline window), then `--arrivals` requests with `--arrival-len`-token prompts come one after the
# other; every gap between two streamed chunks of the long streams is an inter-token latency, counted
# in the window it ends in. Both deployments run one after the other on one local Ray.
# The resident control (engine level): the same newcomers, their prompts' KV put in the decode engine's
# prefix cache before the run, so each joins with every full block a cache hit and no transfer: its
# first step reads its whole prompt's KV as a handed-off newcomer's does. Arrivals against this
# control's arrivals is the cost of the KV moving; the control against quiet is the cost of the batch
# taking a long sequence, which no handoff path removes.


def _spec(async_kv: bool, kv_blocks: int, ports: dict, kv_cache_dtype: str = "auto") -> ClusterSpec:
    return ClusterSpec.from_dict({
        "engine": {"device": "cpu", "num_kv_blocks": kv_blocks, "async_kv_transfer": async_kv,
                   "threads": max(1, (os.cpu_count() or 2) // 2), "kv_cache_dtype": kv_cache_dtype},
        "router": {"max_concurrency": 64},
        **ports,
    })


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


async def _chunk_times(client: httpx.AsyncClient, url: str, body: dict, times: list[float]) -> None:
    """Stream `body`, appending the arrival time of every chunk that carries text (kept however the
    stream ends: the long streams are cancelled at the end of the run)."""
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data:") and '"text":""' not in line.replace(" ", "") and "[DONE]" not in line:
                times.append(time.perf_counter())


async def _run(url: str, model: str, args, count) -> dict[str, list[float]]:
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600) as client:
        chunk_times: list[list[float]] = [[] for _ in range(args.streams)]
        streams = [asyncio.create_task(_chunk_times(client, url, {
            "model": model, "prompt": make_prompt(count, 32, rng), "max_tokens": args.stream_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}, times)) for times in chunk_times]
        await asyncio.sleep(args.warmup_s)
        quiet_from = time.perf_counter()
        await asyncio.sleep(args.quiet_s)
        busy_from = time.perf_counter()
        for _ in range(args.arrivals):
            body = {"model": model, "prompt": make_prompt(count, args.arrival_len, rng), "max_tokens": 4,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            trace = await stream_completion(client, url, body, {}, args.arrival_len)
            if not trace.ok:
                raise SystemExit(f"an arrival failed: {trace.error}")
        busy_to = time.perf_counter()
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    windows: dict[str, list[float]] = {"quiet": [], "arrivals": []}
    for times in chunk_times:
        for a, b in itertools.pairwise(times):
            if quiet_from <= b < busy_from:
                windows["quiet"].append(b - a)
            elif busy_from <= b <= busy_to:
                windows["arrivals"].append(b - a)
    return windows


# The arrivals window's steps split in two (engine level): a newcomer's first step (in the step path
# its KV is loaded inside it) and the other steps taken while a transfer was in flight.
JOIN = "arrivals: a newcomer's first step"
IN_FLIGHT = "arrivals: other steps, KV in flight"
OTHER = "arrivals: other steps"  # the resident control's steps that no newcomer joins: IN_FLIGHT's reference


def _engine_windows(decode, handoffs: list, args, vocab: int,
                    resident: bool = False) -> dict[str, list[float]]:
    """Step times of `decode` with `args.streams` running sequences: quiet, then while `handoffs`
    arrive (one every `args.arrival_every` steps, until the last has its KV and a token); `resident`:
    they arrive as plain prompts (their KV already in the prefix cache)."""
    from ...engine import SamplingParams

    rng = random.Random(1)
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    for i in range(args.streams):
        decode.add_request(f"s{i}", prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(32)],
                           params=long)
    for _ in range(10):
        decode.step()
    windows: dict[str, list[float]] = {"quiet": [], "arrivals": [], JOIN: [], IN_FLIGHT: [], OTHER: []}

    def timed_step() -> list:
        t0 = time.perf_counter()
        outs = decode.step()
        return time.perf_counter() - t0, outs

    for _ in range(args.quiet_steps):
        windows["quiet"].append(timed_step()[0])
    waiting: set[str] = set()
    arrived = step = 0
    while arrived < len(handoffs) or waiting:
        if arrived < len(handoffs) and step % args.arrival_every == 0:
            rid, ids, handoff = handoffs[arrived]
            if resident:  # the prompt and the first token: only that token is computed, as in a handoff
                decode.add_request(rid, prompt_token_ids=[*ids, handoff.first_token],
                                   params=SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            else:
                decode.add_request(rid, prompt_token_ids=ids, kv_import=handoff,
                                   params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            waiting.add(rid)
            arrived += 1
        loading = decode.stats().num_loading_kv
        dt, outs = timed_step()
        windows["arrivals"].append(dt)
        joined = waiting & {o.request_id for o in outs if o.new_token_ids}
        if joined:  # its decode reads its whole prompt's KV: a costlier step with or without a transfer
            windows[JOIN].append(dt)
        elif loading:
            windows[IN_FLIGHT].append(dt)
        elif resident:
            windows[OTHER].append(dt)
        waiting -= joined
        step += 1
    for i in range(args.streams):
        decode.abort_request(f"s{i}")
    while decode.has_unfinished_requests():
        decode.step()
    return windows


def _engine_main(args) -> list[tuple[str, dict[str, list[float]]]]:
    import torch

    from ...engine import LLM
    from ..kvstore.connector import make_connector
    from ..kvstore.master import MasterConfig, MooncakeMaster
    from ..spec import StoreSpec

    torch.set_num_threads(1)
    kw = {"enable_prefix_caching": False, "num_kv_blocks": args.kv_blocks, "max_num_batched_tokens": 4096,
          "kv_cache_dtype": args.kv_cache_dtype}
    with MooncakeMaster(MasterConfig()) as master:
        spec = StoreSpec(rpc_port=master.config.rpc_port, metadata_port=master.config.metadata_port,
                         global_segment_mib=2048, local_buffer_mib=256)
        prefill = LLM(**kw, async_kv_transfer=False).engine
        decodes = {m: LLM(**{**kw, "enable_prefix_caching": m == "resident"},
                          async_kv_transfer=m == "async").engine for m in args.modes}
        connectors = [make_connector(spec, eng) for eng in (prefill, *decodes.values())]
        if None in connectors:
            raise SystemExit("store unreachable")
        try:
            rows = _engine_rows(prefill, decodes, args)
        finally:  # before the master stops: a client closed after it logs every failed unmount
            for connector in connectors:
                connector.close()
    return rows


def _engine_rows(prefill, decodes: dict, args) -> list[tuple[str, dict[str, list[float]]]]:
    from ...engine import SamplingParams

    rows = []
    vocab = prefill.hf_config["vocab_size"]
    rng = random.Random(0)
    handoffs = []
    for i in range(args.arrivals):
        ids = [rng.randrange(100, vocab - 100) for _ in range(args.arrival_len)]
        prefill.add_request(f"a{i}", prompt_token_ids=ids, kv_export=True,
                            params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        outs = []
        while prefill.has_unfinished_requests():
            outs += prefill.step()
        handoffs.append((f"a{i}", ids, outs[-1].kv_handoff))
    for mode, decode in decodes.items():
        if mode == "resident":  # each prompt's KV loaded once, untimed: its blocks stay in the cache
            if args.arrival_len % decode.stats().block_size:
                raise SystemExit("the resident control wants --arrival-len a multiple of the block size "
                                 f"({decode.stats().block_size}): else a newcomer computes more than one "
                                 "token")
            for rid, ids, handoff in handoffs:
                decode.add_request(f"{rid}-seed", prompt_token_ids=ids, kv_import=handoff,
                                   params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
                while decode.has_unfinished_requests():
                    decode.step()
        s0 = decode.stats()
        windows = _engine_windows(decode, handoffs, args, vocab, resident=mode == "resident")
        s1 = decode.stats()
        if s1.kv_recomputed_tokens != s0.kv_recomputed_tokens:
            raise SystemExit(f"{mode}: blocks were recomputed, not loaded")
        hits = s1.prefix_hit_tokens_total - s0.prefix_hit_tokens_total
        if mode == "resident" and hits != len(handoffs) * args.arrival_len:
            raise SystemExit(f"resident: {hits} prompt tokens came from the cache, not all but the first "
                             "token's")
        rows.append((_NAMES[mode], windows))
    return rows


_NAMES = {"sync": "sync (in the step)", "async": "async (off the step)",
          "resident": "resident (no transfer)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=2000, help="long enough to outlast the run")
    ap.add_argument("--arrivals", type=int, default=4)
    ap.add_argument("--arrival-len", type=int, default=3072)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--quiet-s", type=float, default=8.0)
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--modes", nargs="+", choices=["sync", "async", "resident"], default=None,
                    help="which KV paths to run, in this order (default: sync async, and at engine level "
                         "the resident control)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="the KV cache's element type (auto: the model's, float32 on the CPU)")
    ap.add_argument("--served", action="store_true", help="on the served PD cluster (else one engine)")
    ap.add_argument("--quiet-steps", type=int, default=40, help="engine level: steps before the arrivals")
    ap.add_argument("--arrival-every", type=int, default=4, help="engine level: steps between arrivals")
    args = ap.parse_args(argv)
    if args.modes is None:
        args.modes = ["sync", "async"] if args.served else ["sync", "async", "resident"]
    elif args.served and "resident" in args.modes:
        ap.error("the resident control runs at engine level only")
    logging.basicConfig(level=logging.WARNING)
    rows = _served_main(args) if args.served else _engine_main(args)
    where = "served PD cluster" if args.served else "one decode engine, 1 thread"
    print(f"\n{args.streams} streams decoding; {args.arrivals} arrivals of {args.arrival_len}-token prompts "
          f"(KV through a Mooncake store; {where}; {args.kv_cache_dtype} KV cache); inter-token latency "
          "of the running streams, ms")
    control = dict(rows).get(_NAMES["resident"])
    extra = " p99 / resident's p99 |" if control else ""
    print("| KV move | window | ITLs | p50 | p99 | max | p99 / quiet p99 |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|" if control else ""))
    for name, w in rows:
        base = _pct(w["quiet"], 0.99)
        for window, itl in w.items():
            if not itl:
                continue
            line = (f"| {name} | {window} | {len(itl)} | {statistics.median(itl) * 1e3:.1f} | "
                    f"{_pct(itl, 0.99) * 1e3:.1f} | {max(itl) * 1e3:.1f} | {_pct(itl, 0.99) / base:.2f}x |")
            if control:
                ref = control[OTHER if window == IN_FLIGHT else window]
                line += f" {_pct(itl, 0.99) / _pct(ref, 0.99):.2f}x |"
            print(line)
    return 0


def _served_main(args) -> list[tuple[str, dict[str, list[float]]]]:
    import ray
    from ray import serve

    from ...actors.names import NAMESPACE
    from ...engine.tokenizer import Tokenizer
    from ...engine.weights import resolve_model_path
    from ..launch.deployment import deploy, http_url, teardown
    from ..launch.ray_env import this_machines_ray_env
    from .bench_cluster import local_ports

    ports = local_ports()
    specs = {_NAMES[m]: _spec(m == "async", args.kv_blocks, ports, args.kv_cache_dtype) for m in args.modes}
    first = next(iter(specs.values()))
    count = token_counter(Tokenizer(resolve_model_path(first.model.path)).hf)
    os.environ.update(this_machines_ray_env(first))   # the same Serve proxy for every spec
    ray.init(namespace=NAMESPACE, num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             resources={"pd_prefill": 1, "pd_decode": 1}, logging_level=logging.WARNING)
    rows = []
    try:
        for name, spec in specs.items():
            deploy(spec)
            try:
                url = http_url(spec) + "/v1/completions"
                windows = asyncio.run(_run(url, spec.model.served_name, args, count))
            finally:
                teardown()
                serve.shutdown()
            rows.append((name, windows))
    finally:
        ray.shutdown()

    return rows


if __name__ == "__main__":
    sys.exit(main())
