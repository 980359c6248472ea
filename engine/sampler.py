"""Turn the logits of the sequences that finished their step into next tokens.

Greedy rows take the argmax; the others are temperature-scaled, top-k/top-p filtered and drawn with
the sequence's own generator (seeded requests are reproducible whatever else is in the batch).
Logprobs are those of the model's distribution (before temperature), as OpenAI reports them.
"""
from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        probs = _filtered_probs(logits[rows], [seqs[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, seqs)


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    logits = logits / temps[:, None]
    top_k = [s.params.top_k if s.params.top_k > 0 else logits.shape[-1] for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(k < logits.shape[-1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1])[None, :]
        drop = ranks >= torch.tensor(top_k)[:, None]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p, and always the first token (a top_p
        # that rounds to 0 in float32 would otherwise drop every token)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= torch.tensor(top_p, dtype=logits.dtype)[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _logprobs(logits: torch.Tensor, tokens: list[int],
              seqs: list[Sequence]) -> list[TokenLogprob | None]:
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[torch.tensor(wanted)], dim=-1)
    for j, i in enumerate(wanted):
        n = seqs[i].params.logprobs
        top: tuple[tuple[int, float], ...] = ()
        if n:
            values, ids = logp[j].topk(n)
            top = tuple(zip(ids.tolist(), values.tolist()))
        out[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
    return out
