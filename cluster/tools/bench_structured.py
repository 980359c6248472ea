"""Structured output's cost per output token next to unconstrained decoding, same engine, one run.

    python -m pdcluster.cluster.tools.bench_structured [--batch 1 32] [--output-len 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# The constrained requests use a JSON schema (an array of at least 200 objects with an integer, a
# bounded string and an enum) that cannot be complete within --output-len tokens, so every request
# emits exactly --output-len tokens, as the unconstrained ones do under ignore_eos: the two sides
# compute the same number of tokens from the same prompts, and the difference is the grammar's
# (bitmask fill per sequence, batched mask, matcher advance). Both are measured back to back per round.
SCHEMA = {"type": "object", "required": ["items"], "properties": {"items": {
    "type": "array", "minItems": 200, "items": {
        "type": "object", "required": ["id", "name", "tier"],
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                       "tier": {"enum": ["gold", "silver", "bronze"]}}}}}}


def _run(llm, prompts: list[list[int]], params) -> tuple[float, int]:
    eng, t0 = llm.engine, time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"bench-{t0}-{i}", prompt_token_ids=p, params=params)
    tokens = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens += len(out.new_token_ids)
            if out.finish_reason not in (None, "length"):
                raise RuntimeError(f"a request ended early ({out.finish_reason}: {out.error})")
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ...engine import LLM, SamplingParams
    from ...engine.sampling import StructuredOutput

    llm = LLM(max_num_seqs=max(args.batch), max_num_batched_tokens=2048, kv_cache_gib=1.0)
    n = args.output_len
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=n, ignore_eos=True)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=n,
                                 structured_output=StructuredOutput("json_schema", json.dumps(SCHEMA)))

    def prompts(batch: int, r: int) -> list[list[int]]:
        # distinct per round and request: the prefix cache must not serve one run from another
        return [llm.chat_prompt([{"role": "user", "content": f"List {batch * 10 + i} customers as JSON "
                                  f"(round {r})."}]) for i in range(batch)]

    _run(llm, prompts(1, -1), constrained), _run(llm, prompts(1, -2), plain)   # warm-up, compile
    rows: dict[int, list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for b in args.batch:
            ps = prompts(b, r)
            t_c, n_c = _run(llm, ps, constrained)
            t_p, n_p = _run(llm, prompts(b, r + 1000), plain)
            assert n_c == n_p == b * n
            rows.setdefault(b, []).append((1e3 * t_p / n_p, 1e3 * t_c / n_c))
    print(f"model {llm.engine.model_path.name}  threads {args.threads}  output {n}  rounds {args.rounds}")
    print(f"{'ms per output token':<24}{'plain':>10}{'json_schema':>14}{'ratio':>8}{'ratio range':>14}")
    med = statistics.median
    for b, pairs in rows.items():
        ratios = [c / p for p, c in pairs]
        print(f"{f'batch {b}':<24}{med([p for p, _ in pairs]):>10.2f}{med([c for _, c in pairs]):>14.2f}"
              f"{med(ratios):>8.2f}{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}")
    print("wall time per output token, prefill included on both sides (same prompt lengths); "
          "medians over rounds, the ratio is the median of the rounds' ratios.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
