"""Verification of drafted tokens against the target model: exact for greedy (accept while the
draft is the argmax) and for sampling (speculative rejection sampling against a point-mass draft)."""
from __future__ import annotations

from collections.abc import Collection

import torch

from ..outputs import TokenLogprob
from ..sampler import _filtered_probs, _logprobs, argmax, draw, process_logits
from ..sequence import Sequence


def accept_greedy(argmax: list[int], drafts: list[int]) -> list[int]:
    """argmax: the target's choice at each of the len(drafts)+1 positions. Returns the drafts the
    target agrees with, then its own token at the first disagreement (or after the last draft)."""
    out: list[int] = []
    for target, draft in zip(argmax, drafts):
        out.append(target)
        if target != draft:
            return out
    out.append(argmax[len(drafts)])
    return out


def accept_sampled(probs: torch.Tensor, drafts: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """probs: [len(drafts)+1, V] target distributions (after temperature, top-k, top-p) at each
    position. The drafter is deterministic (q is a point mass on the draft x), so x is accepted with
    probability min(1, p(x)/q(x)) = p(x); on rejection the token is drawn from max(p - q, 0)
    renormalized, i.e. p without x. Every emitted token is then distributed exactly as p."""
    out: list[int] = []
    for i, x in enumerate(drafts):
        p = probs[i]
        if torch.rand((), generator=generator) < p[x]:
            out.append(x)
            continue
        residual = p.clone()
        residual[x] = 0.0
        if residual.sum() <= 0:   # p(x) is 1 up to rounding: nothing else to draw
            out.append(x)
            continue
        out.append(int(draw(residual[None], [generator])[0]))
        return out
    out.append(int(draw(probs[len(drafts)][None], [generator])[0]))
    return out


def verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
           eos_token_ids: Collection[int] = ()) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
    """logits: [sum(len(d)+1), V], each sequence's len(drafts[i])+1 positions in order. Returns each
    sequence's emitted tokens (its accepted drafts, then one token of the target's) and their
    logprobs under the target model (None where the request asked for none). A sequence whose
    logits are processed (penalties, bias, grammar) comes without drafts: one row, processed."""
    raw = logits.float()
    logits = process_logits(raw, [s for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)],
                            eos_token_ids)
    starts, row = [], 0
    for d in drafts:
        starts.append(row)
        row += len(d) + 1
    best = argmax(logits).tolist()
    random = [i for i, s in enumerate(seqs) if not s.params.greedy]
    probs = None
    if random:
        rows = torch.tensor([starts[i] + j for i in random for j in range(len(drafts[i]) + 1)])
        row_seqs = [seqs[i] for i in random for _ in range(len(drafts[i]) + 1)]
        probs = _filtered_probs(logits[rows], row_seqs)
    tokens: list[list[int]] = []
    at = 0
    for i, (seq, d) in enumerate(zip(seqs, drafts)):
        n = len(d) + 1
        if seq.params.greedy:
            tokens.append(accept_greedy(best[starts[i]:starts[i] + n], d))
        else:
            tokens.append(accept_sampled(probs[at:at + n], d, seq.generator))
            at += n
    if all(s.params.logprobs is None for s in seqs):
        return tokens, [[None] * len(t) for t in tokens]
    # logprobs of every emitted token, from the row that produced it
    rows = [starts[i] + j for i, t in enumerate(tokens) for j in range(len(t))]
    flat = [tok for t in tokens for tok in t]
    row_seqs = [seqs[i] for i, t in enumerate(tokens) for _ in t]
    flat_lp = _logprobs(raw[torch.tensor(rows)], flat, row_seqs)
    logprobs, at = [], 0
    for t in tokens:
        logprobs.append(flat_lp[at:at + len(t)])
        at += len(t)
    return tokens, logprobs
