"""N-gram speculative decoding vs plain decoding, same model, same process, in rounds.

    python -m pdcluster.cluster.tools.bench_spec [--batch 1 8] [--rounds 3] [--max-tokens 128]
                                                 [--k 3] [--lookup-max 4] [--lookup-min 2]

Two engines (one speculating, one not) run the same greedy requests back to back in each round, so
a slow spell of a shared machine hits both. Workloads: copy-heavy (the model repeats or edits a
given text: prompt lookup finds its drafts there) and free-form (answers with little to look up).
Prints output tok/s of each (whole requests, prefill included), their ratio, the draft acceptance
rate and the mean tokens a sequence gains per step, and checks the outputs are token-identical.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

PASSAGES = [
    ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass "
     "lantern, a flask of tea and a notebook in which he recorded every ship that passed the point. "
     "In forty years he had never missed a night, not even in the great storm of the winter when "
     "the waves broke over the gallery and the glass shook in its frame."),
    ("To make the bread, mix the flour, salt and yeast in a large bowl, then add the warm water and "
     "the olive oil. Knead the dough for ten minutes until it is smooth and elastic, cover it with a "
     "damp cloth and leave it to rise for an hour. Shape it into a loaf, let it rise again for thirty "
     "minutes, and bake it at two hundred degrees for thirty five minutes."),
    ("The committee met on Tuesday to review the budget for the coming year. After a long discussion "
     "the members agreed to increase the funding for the library, to postpone the repairs to the "
     "community hall until the spring, and to ask the council for a grant to replace the playground "
     "equipment in the park next to the primary school."),
    ("Photosynthesis is the process by which green plants use sunlight to turn water and carbon "
     "dioxide into glucose and oxygen. It takes place in the chloroplasts, which contain the pigment "
     "chlorophyll. The glucose is used by the plant for energy and growth, and the oxygen is "
     "released into the air through small pores in the leaves called stomata."),
]
COPY_TASKS = [
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Rewrite the following text, changing only every 'the' to 'THE':\n\n{text}",
    "Copy this paragraph and then stop:\n\n{text}",
]
FREE_TASKS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten year old.",
    "Give me five ideas for a birthday party in the garden.",
    "Describe your perfect weekend in a small mountain village.",
    "What are the pros and cons of working from home?",
    "Write a letter to a friend about a trip to the seaside.",
    "Why is the sky blue? Answer in a few paragraphs.",
    "Invent a new sport and describe its rules.",
]


def _requests(llm, workload: str, n: int, round_: int) -> list[list[int]]:
    """n chat prompts; a round tag at the start of each keeps the prefix cache from serving a
    round from the last one (or the other engine's run)."""
    out = []
    for i in range(n):
        j = round_ * 7 + i
        if workload == "copy":
            body = COPY_TASKS[j % len(COPY_TASKS)].format(text=PASSAGES[j % len(PASSAGES)])
        else:
            body = FREE_TASKS[j % len(FREE_TASKS)]
        out.append(llm.chat_prompt([{"role": "user", "content": f"[{round_}.{i}] {body}"}]))
    return out


def _run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], int]:
    """Runs all prompts as one batch; returns wall time, the outputs, and how many times a sequence
    got new tokens (one per sequence per step)."""
    from ...engine import SamplingParams
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    ids = [f"bench-{t0}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, prompt_token_ids=p, params=params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    updates = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
            updates += 1
    return time.perf_counter() - t0, [tokens[r] for r in ids], updates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workloads", nargs="+", default=["copy", "free"], choices=["copy", "free"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    # 3, not 4: on the CPU each verified row costs about a third of a decode step (the block
    # kernel's multi-row path), so a fourth draft rarely pays for itself
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.set_num_threads(args.threads)
    from ...engine import LLM
    common = {"max_num_seqs": max(args.batch), "max_num_batched_tokens": 2048, "kv_cache_gib": 1.0}
    base = LLM(**common)
    spec = LLM(**common, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.k,
        "prompt_lookup_max": args.lookup_max, "prompt_lookup_min": args.lookup_min})
    warm = _requests(base, "free", 1, 999)
    _run(base, warm, 4), _run(spec, warm, 4)          # first-call costs out of the way

    rows = []
    identical = True
    for workload in args.workloads:
        for b in args.batch:
            rates: list[tuple[float, float]] = []
            drafted = accepted = tokens = updates = 0
            for r in range(args.rounds):
                prompts = _requests(base, workload, b, r)
                t_base, out_base, _ = _run(base, prompts, args.max_tokens)
                before = spec.engine.stats()
                t_spec, out_spec, n_updates = _run(spec, prompts, args.max_tokens)
                after = spec.engine.stats()
                identical &= out_base == out_spec
                n = sum(len(t) for t in out_spec)
                rates.append((n / t_base, n / t_spec))
                drafted += after.spec_draft_tokens_total - before.spec_draft_tokens_total
                accepted += after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
                tokens += n
                updates += n_updates
            rows.append((workload, b, rates, accepted / max(drafted, 1), tokens / updates,
                         tokens / (args.rounds * b)))

    med = statistics.median
    print(f"model {base.engine.model_path.name}  threads {args.threads}  max_tokens "
          f"{args.max_tokens}  rounds {args.rounds}  ngram k={args.k} "
          f"lookup {args.lookup_min}-{args.lookup_max}")
    print(f"{'workload':<10}{'batch':>6}{'plain tok/s':>13}{'spec tok/s':>12}{'ratio':>7}"
          f"{'ratio range':>13}{'accept':>8}{'tok/step':>10}{'out len':>9}")
    for workload, b, rates, acceptance, per_step, out_len in rows:
        ratios = [s / p for p, s in rates]
        print(f"{workload:<10}{b:>6}{med([p for p, _ in rates]):>13.1f}"
              f"{med([s for _, s in rates]):>12.1f}{med(ratios):>7.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}{acceptance:>8.2f}{per_step:>10.2f}"
              f"{out_len:>9.0f}")
    print("tok/s: output tokens of the whole batch over its wall time (prefill included), median "
          "over rounds; ratio: median of the rounds' spec/plain; accept: accepted / drafted tokens; "
          "tok/step: tokens a sequence gains per step it is sampled in (1 + accepted drafts); "
          f"outputs token-identical: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
