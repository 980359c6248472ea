"""Turn the logits of the sequences that finished their step into next tokens.

Logits are first processed, batched, for the rows that ask for it: repetition, frequency and presence
penalties, logit_bias, min_tokens (EOS masked; stop strings count from it, in the detokenizer) and, last, the grammar's token bitmask (one bitmask
for the batch, filled only for constrained rows). Greedy rows then take the argmax; the others are
temperature-scaled, top-k/top-p filtered and drawn with the sequence's own generator (seeded requests
are reproducible whatever else is in the batch). Logprobs are those of the model's raw distribution
(before any processing or temperature), as vLLM reports them by default.
"""
from __future__ import annotations

from collections.abc import Collection

import torch

from .outputs import TokenLogprob
from .sequence import Sequence
from .structured_output import allocate_bitmask, apply_bitmask


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int] = ()
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    raw = logits.float()
    logits = process_logits(raw, seqs, eos_token_ids)
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        probs = _filtered_probs(logits[rows], [seqs[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, token_list, seqs)


def process_logits(logits: torch.Tensor, seqs: list[Sequence],
                   eos_token_ids: Collection[int] = ()) -> torch.Tensor:
    """Penalties, logit_bias, min_tokens and grammar masks applied to the rows (one per sequence)
    that ask for them; returns `logits` itself when no row does. A row whose grammar allows no token
    is left unmasked and its matcher marked failed: the engine ends that request with an error."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
    if not rows:
        return logits
    raw, logits = logits, logits.clone()
    vocab = logits.shape[-1]
    pen = [i for i in rows if seqs[i].params.has_penalties]
    if pen:
        _apply_penalties(logits, [seqs[i] for i in pen], torch.tensor(pen), vocab)
    for i in rows:
        p = seqs[i].params
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits[i, list(ids)] += torch.tensor(bias)
        if p.min_tokens and seqs[i].num_output_tokens < p.min_tokens:
            banned = [t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab]
            logits[i, banned] = float("-inf")
    constrained = [i for i in rows if seqs[i].matcher is not None]
    if constrained:
        bitmask = allocate_bitmask(len(seqs), vocab)
        for i in constrained:
            seqs[i].matcher.fill_bitmask(bitmask, i)
        apply_bitmask(logits, bitmask, constrained)
        # no token left (the grammar, or the grammar with min_tokens): the row samples from the raw
        # logits rather than NaN, and the engine ends the request on the matcher's failure
        dead = torch.isneginf(logits[constrained]).all(dim=-1).nonzero().flatten().tolist()
        for j in dead:
            i = constrained[j]
            seqs[i].matcher.fail("the grammar allows no next token"
                                 + (" before min_tokens" if seqs[i].params.min_tokens else ""))
            logits[i] = raw[i]
    return logits


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor, vocab: int) -> None:
    """OpenAI's frequency/presence penalties over the generated tokens and HF's repetition penalty
    over prompt and generated tokens, for `rows` of logits (one per seq), in place."""
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
