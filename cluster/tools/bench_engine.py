"""Engine throughput next to `transformers` generate, same model, same threads, one run.

    python -m pdcluster.cluster.tools.bench_engine [--input-len 128] [--output-len 128] [--concurrency 1 8 32]
                                             [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

# Prints decode tokens/s at batch 1 and aggregate output tokens/s at each concurrency for our engine
# (all requests in one continuous batch) and for transformers run sequentially (its per-request rate
# is its aggregate rate, so it is measured on a few requests), and the ratios. Both sides are measured
# back to back in each of several rounds, so a slow spell of a shared machine hits both.


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def _hf_model(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=dtype).eval()


class _Clock:
    """A transformers streamer that only timestamps each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def _hf_generate(model, prompt: list[int], new: int) -> tuple[float, list[float]]:
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, streamer=clock)
    assert out.shape[1] - len(prompt) == new
    return time.perf_counter() - t0, clock.times


def generate_batch(eng, prompts: list[list[int]], new: int) -> tuple[float, list[float]]:
    """Runs all prompts as one continuous batch on an engine (`LLMEngine`), greedy, exactly `new`
    tokens each; returns the wall time and the token times of the first prompt."""
    from ...engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"bench-{t0}-{i}", prompt_token_ids=p, params=params)
    first, times, counts = f"bench-{t0}-0", [], 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            counts += len(out.new_token_ids)
            if out.request_id == first:
                times.append(time.perf_counter())
    assert counts == new * len(prompts)
    return time.perf_counter() - t0, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--baseline-requests", type=int, default=3,
                    help="sequential transformers requests measured (its rate does not depend on count)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="both sides measured back to back this many times (shared machines drift)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations, the same for both sides")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.set_num_threads(args.threads)
    from ...engine import LLM
    llm = LLM(max_num_seqs=max(args.concurrency), max_num_batched_tokens=2048,
              kv_cache_gib=2.0, dtype=args.dtype)
    hf = _hf_model(llm.engine.model_path, getattr(torch, args.dtype))
    vocab = llm.engine.hf_config["vocab_size"]
    n_in, n_out = args.input_len, args.output_len

    warm = random_prompts(1, 16, vocab, 0)
    generate_batch(llm.engine, warm, 4), _hf_generate(hf, warm[0], 4)  # first-call costs out of the way

    base = random_prompts(args.baseline_requests, n_in, vocab, 2)
    rows: dict[str, list[tuple[float, float]]] = {}   # measure -> (ours, transformers) per round
    for r in range(args.rounds):
        # batch-1 decode rate: token times after the first, so prefill is excluded on both sides
        p1 = random_prompts(1, n_in, vocab, 1000 * (r + 1))
        rows.setdefault("decode tok/s, batch 1", []).append(
            (decode_rate(generate_batch(llm.engine, p1, n_out)[1]),
             decode_rate(_hf_generate(hf, p1[0], n_out)[1])))
        hf_agg = len(base) * n_out / sum(_hf_generate(hf, p, n_out)[0] for p in base)
        for c in args.concurrency:
            # new prompts every round: the prefix cache must not serve a round from the last one
            prompts = random_prompts(c, n_in, vocab, 1000 * (r + 1) + c)
            agg = c * n_out / generate_batch(llm.engine, prompts, n_out)[0]
            rows.setdefault(f"output tok/s, {c} concurrent", []).append((agg, hf_agg))

    print(f"model {llm.engine.model_path.name}  {args.dtype}  threads {args.threads}  "
          f"input {n_in}  output {n_out}  rounds {args.rounds}")
    print(f"{'measure':<34}{'pdcluster':>12}{'transformers':>14}{'ratio':>8}{'ratio range':>16}")
    med = statistics.median
    for label, pairs in rows.items():
        ratios = [a / b for a, b in pairs]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{label:<34}{med([a for a, _ in pairs]):>12.1f}{med([b for _, b in pairs]):>14.1f}"
              f"{med(ratios):>8.2f}{spread:>16}")
    print("transformers runs the requests one after another (generate, batch 1, greedy); "
          "pdcluster runs them as one continuous batch. Each round measures both sides back to "
          "back; columns are medians over rounds, the ratio is the median of the rounds' ratios.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
