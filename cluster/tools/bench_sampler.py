"""Sampling's cost in the decode step, the engine's sampler next to the plain torch one, one run.

    python -m pdcluster.cluster.tools.bench_sampler [--batch 1 8 32] [--output-len 48] [--rounds 2]

The baseline is what a sampler written the obvious way in torch does, with the same semantics
(penalties; temperature, then top-k, then top-p over what top-k kept): penalties as dense passes over
every row's vocabulary, one sort of every row's vocabulary for top-k/top-p, then `torch.multinomial`
per row with the row's generator (on the CPU it draws an exponential variate for every token of the
vocabulary). The engine's sampler penalizes only the tokens a sequence has seen, looks for the cut
among each row's most likely tokens and draws by inverse transform (engine/sampler.py). Each setting
runs the same prompts through the same engine with one sampler, then the other, in every round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Collection

import torch

from ...engine import model_runner
from ...engine.sampler import _logprobs
from ...engine.sequence import Sequence

SETTINGS = {"greedy": {"temperature": 0.0},
            "temperature 1": {"temperature": 1.0},
            "t 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
            "t 0.7, top_k 20, top_p 0.8": {"temperature": 0.7, "top_k": 20, "top_p": 0.8},
            "greedy, presence_penalty 1.5": {"temperature": 0.0, "presence_penalty": 1.5}}


def dense_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor, vocab: int) -> None:
    """engine.sampler._apply_penalties written with dense [rows, vocab] counts."""
    def counts(token_lists: list[list[int]]) -> torch.Tensor:
        c = torch.zeros(len(token_lists), vocab)
        for j, ids in enumerate(token_lists):
            if ids:
                c[j].scatter_add_(0, torch.tensor(ids), torch.ones(len(ids)))
        return c

    out = counts([s.output_token_ids for s in seqs])
    seen = (counts([s.token_ids[:s.num_prompt_tokens] for s in seqs]) + out) > 0
    x = logits[rows]
    rep = torch.tensor([s.params.repetition_penalty for s in seqs])[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs])[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs])[:, None]
    logits[rows] = x - freq * out - pres * (out > 0).float()


def reference_sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int] = ()):
    """The plain torch sampler, the signature of engine.sampler.sample and its semantics for what
    the benchmark sends (penalties, temperature, top-k, top-p; no bias, min_tokens or grammar)."""
    if any(s.params.logit_bias or s.params.min_tokens or s.params.structured_output or s.params.min_p
           for s in seqs):
        raise ValueError("the baseline sampler takes penalties, temperature, top-k and top-p only")
    raw = logits.float()
    logits = raw.clone()
    penalized = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if penalized:
        dense_penalties(logits, [seqs[i] for i in penalized], torch.tensor(penalized), logits.shape[-1])
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        x = logits[rows] / torch.tensor([seqs[i].params.temperature for i in rows])[:, None]
        vocab = x.shape[-1]
        top_k = torch.tensor([seqs[i].params.top_k if seqs[i].params.top_k > 0 else vocab for i in rows])
        top_p = torch.tensor([seqs[i].params.top_p for i in rows])
        if (top_k < vocab).any() or (top_p < 1).any():
            x, order = x.sort(dim=-1, descending=True)
            x = x.masked_fill(torch.arange(vocab)[None, :] >= top_k[:, None], float("-inf"))
            probs = x.softmax(dim=-1)
            drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
            drop[:, 0] = False
            x = torch.empty_like(x).scatter_(-1, order, x.masked_fill(drop, float("-inf")))
        probs = x.softmax(dim=-1)
        for j, i in enumerate(rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, token_list, seqs)


def _decode_steps(llm, prompts: list[list[int]], params, sampler, sample_times: list[float]) -> list[float]:
    """Runs the prompts as one batch with `sampler` in the model runner; returns the wall time of
    each step once every request has its first token (decode steps of the whole batch)."""
    engine, t0 = llm.engine, time.perf_counter()
    ours = model_runner.sample

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return sampler(*args, **kwargs)
        finally:
            sample_times.append(time.perf_counter() - t)

    model_runner.sample = timed
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"bench-{t0}-{i}", prompt_token_ids=p, params=params)
        started, steps, last = set(), [], None
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            if len(started) == len(prompts) and last is not None:
                steps.append(now - last)
            started.update(o.request_id for o in outs)
            last = now
    finally:
        model_runner.sample = ours
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    from ...engine import LLM, SamplingParams

    llm = LLM(max_num_seqs=max(args.batch), max_num_batched_tokens=2048, kv_cache_gib=1.0,
              threads=args.threads)
    ours = model_runner.sample
    samplers = {"engine": ours, "torch": reference_sample}

    def prompts(batch: int, r: int, name: str) -> list[list[int]]:
        # distinct per round, setting and sampler: the prefix cache must not serve one from another
        return [llm.chat_prompt([{"role": "user", "content": f"Tell story {i} about {name} ({r})."}])
                for i in range(batch)]

    warm = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, ignore_eos=True)
    for name, fn in samplers.items():
        _decode_steps(llm, prompts(2, -1, name), warm, fn, [])
    step: dict[tuple, list[float]] = {}
    sampled: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for b in args.batch:
            for setting, kw in SETTINGS.items():
                params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, seed=r, **kw)
                for name, fn in samplers.items():
                    times: list[float] = []
                    steps = _decode_steps(llm, prompts(b, r, f"{setting} {name}"), params, fn, times)
                    step.setdefault((b, setting, name), []).append(statistics.median(steps))
                    # the last len(steps) calls are the decode steps'
                    sampled.setdefault((b, setting, name), []).append(statistics.median(times[-len(steps):]))
    print(f"model {llm.engine.model_path.name}  threads {args.threads}  output {args.output_len}  "
          f"rounds {args.rounds}")
    print("| batch | sampling | decode step, engine (ms) | decode step, torch (ms) | torch / engine | "
          "sampler, engine (ms) | sampler, torch (ms) | step over greedy's, engine | "
          "step over greedy's, torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = min     # the fastest round of each: the VM slows whole rounds, not one side of one
    for b in args.batch:
        g_e, g_t = best(step[b, "greedy", "engine"]), best(step[b, "greedy", "torch"])
        for setting in SETTINGS:
            e, t = best(step[b, setting, "engine"]), best(step[b, setting, "torch"])
            se, st = best(sampled[b, setting, "engine"]), best(sampled[b, setting, "torch"])
            print(f"| {b} | {setting} | {1e3 * e:.2f} | {1e3 * t:.2f} | {t / e:.2f}x | {1e3 * se:.2f} | "
                  f"{1e3 * st:.2f} | {e / g_e:.2f}x | {t / g_t:.2f}x |")
    print("medians over each round's decode steps (every request past its first token), the best "
          "round of each; 'sampler' is the time in the sampling call of those steps.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
