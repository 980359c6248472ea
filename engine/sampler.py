"""Turn the logits of the sequences that finished their step into next tokens.

Logits are first processed, batched, for the rows that ask for it: repetition, frequency and presence
penalties, logit_bias, min_tokens (EOS masked; stop strings count from it, in the detokenizer) and,
last, the grammar's token bitmask (one bitmask for the batch, filled only for constrained rows).
Greedy rows then take the argmax; the others are temperature-scaled, cut to the tokens at least min_p
times as likely as the likeliest, then to their top-k, then to the top-p nucleus of what is left
(vLLM's order; transformers applies min_p after top-p), and drawn by inverse transform: one uniform
from the sequence's own generator against the row's cumulative distribution (seeded requests are
reproducible whatever else is in the batch). The top-k/top-p cut looks for its tokens among each
row's few hundred most likely ones first and widens only where the nucleus reaches past them,
instead of sorting the vocabulary. Logprobs are those of the model's raw distribution (before any
processing or temperature), as vLLM reports them by default.
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
    tokens = torch.empty(len(seqs), dtype=torch.long)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        tokens[greedy] = argmax(_rows(logits, greedy))
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        probs = _filtered_probs(_rows(logits, random_rows), [seqs[i] for i in random_rows])
        tokens[random_rows] = draw(probs, [seqs[i].generator for i in random_rows])
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, token_list, seqs)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token, the first of equal maxima as torch.argmax's (max's kernel
    finds it several times faster on the CPU)."""
    return logits.max(dim=-1).indices


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == len(x) else x[torch.tensor(rows)]


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
    over prompt and generated tokens, for `rows` of logits (one per seq), in place. Only the tokens
    the sequences have seen are read and written, all rows at once: a dense pass over the
    vocabulary per row cost more than the model's step at batch 32."""
    lengths = torch.tensor([len(s.token_ids) for s in seqs])
    tokens = torch.tensor([t for s in seqs for t in s.token_ids])
    row = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    # a token's place in its sequence, against where the sequence's prompt ends
    place = torch.arange(len(tokens)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    generated = (place >= torch.tensor([s.num_prompt_tokens for s in seqs])[row]).float()
    inside = tokens < vocab
    keys, where = (row * vocab + tokens)[inside].unique(return_inverse=True)
    count = torch.zeros(len(keys)).index_add_(0, where, generated[inside])  # per (sequence, token)
    seq_of, token = keys // vocab, keys % vocab

    def param(name: str) -> torch.Tensor:
        return torch.tensor([float(getattr(s.params, name)) for s in seqs])[seq_of]

    at = (rows[seq_of], token)
    x = logits[at]
    rep = param("repetition_penalty")
    x = torch.where(x > 0, x / rep, x * rep)
    logits[at] = x - param("frequency_penalty") * count - param("presence_penalty") * (count > 0).float()


# how many of a row's most likely tokens the top-k/top-p cut looks among first; where a row's nucleus
# reaches past them, it looks again among four times as many (at most the vocabulary)
CANDIDATES = 256


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's distribution after its temperature, min-p, top-k and top-p: dense [rows, vocab]."""
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    probs = (logits / temps[:, None]).softmax(dim=-1)
    if any(s.params.min_p for s in seqs):
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=logits.dtype)
        probs.masked_fill_(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        probs /= probs.sum(dim=-1, keepdim=True)
    vocab = logits.shape[-1]
    top_k = torch.tensor([s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs])
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)
    cut = ((top_k < vocab) | (top_p < 1.0)).nonzero().flatten().tolist()
    if len(cut) == len(seqs):
        return _nucleus(probs, top_k, top_p)
    if cut:
        probs[cut] = _nucleus(probs[cut], top_k[cut], top_p[cut])
    return probs


def _nucleus(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row of `probs` cut to its top_k most likely tokens, then to the smallest set of those,
    most likely first, whose mass (renormalized over the top k) reaches top_p (always the first
    token: a top_p that rounds to 0 in float32 keeps it alone), and renormalized. What is kept is
    every token at least as likely as the least likely one the cut needs, so tokens tied with it
    all stay (as transformers' top-k keeps them) and the cut depends on the row's values alone,
    never on which of equal tokens a top-k returned. Rows are looked at among their `CANDIDATES`
    most likely tokens (at least their top_k); a row whose nucleus is not complete there is looked
    at again among four times as many."""
    vocab = probs.shape[-1]
    least = torch.zeros(len(probs), dtype=probs.dtype)   # each row's least likely kept probability
    pending = torch.arange(len(probs))
    has_k = top_k < vocab
    n = min(vocab, max(CANDIDATES, int(top_k[has_k].max()) if has_k.any() else 0))
    while len(pending):
        vals = (probs if len(pending) == len(probs) else probs[pending]).topk(n, dim=-1).values
        k, p, by_k = top_k[pending], top_p[pending], has_k[pending]
        in_k = torch.arange(n)[None, :] < k[:, None]
        share = vals.double() * in_k
        # top-p's mass is over the top-k set, renormalized, where there is one, else over the whole
        # vocabulary; in float64: summed in float32, a long tail's mass rounds to 1 and top_p 1
        # would cut it
        share /= torch.where(by_k, share.sum(dim=-1), 1.0)[:, None]
        mass = share.cumsum(dim=-1)
        keep = in_k & ((mass - share < p[:, None]) | (p[:, None] >= 1.0))   # a prefix of each row
        keep[:, 0] = True
        # complete: the row's top-k set is all here, or what is here already holds top_p's mass
        done = by_k | (mass[:, -1] >= p) if n < vocab else torch.ones_like(by_k)
        last = keep.sum(dim=-1) - 1
        least[pending[done]] = vals.gather(1, last[:, None]).flatten()[done]
        pending, n = pending[~done], min(vocab, 4 * n)
    kept = torch.where(probs >= least[:, None], probs, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


# tokens per span in the draw's two-level search: the spans' masses, then one span's cumulative
# mass, instead of the whole vocabulary's
SPAN = 256


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` ([rows, vocab], each row's mass need not be 1) by inverse
    transform: the row's `generator` gives one uniform u, and the token is the first whose
    cumulative mass passes u times the row's total (found span by span). A token of zero mass is
    never drawn."""
    rows, vocab = probs.shape
    total = probs.sum(dim=-1)
    if not torch.isfinite(total).all() or (total <= 0).any():
        raise ValueError("a row to draw from has no mass or a non-finite one (NaN or inf logits)")
    whole = vocab // SPAN * SPAN
    span_mass = probs[:, :whole].reshape(rows, -1, SPAN).sum(dim=-1)
    if whole < vocab:
        span_mass = torch.cat([span_mass, probs[:, whole:].sum(dim=-1, keepdim=True)], dim=-1)
    span_cdf = span_mass.double().cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    target = u * span_cdf[:, -1]
    span = torch.searchsorted(span_cdf, target[:, None], right=True).flatten()
    span.clamp_(max=span_cdf.shape[-1] - 1)
    before = torch.where(span > 0, span_cdf.gather(1, (span - 1).clamp(min=0)[:, None]).flatten(), 0.0)
    ids = span[:, None] * SPAN + torch.arange(SPAN)
    inside = probs.gather(1, ids.clamp(max=vocab - 1)).double().masked_fill_(ids >= vocab, 0.0)
    inside = inside.cumsum(dim=-1)
    # where in the span, as a share of its mass (its sum and its cumulative sum differ by rounding)
    share = (target - before) / span_mass.gather(1, span[:, None]).flatten().double()
    at = torch.searchsorted(inside, (share * inside[:, -1])[:, None], right=True)
    tokens = ids.gather(1, at.clamp(max=SPAN - 1)).flatten().clamp_(max=vocab - 1)
    # rounding (u * total reaching the total) can land past a row's last token of mass: the last
    # one at or before it is taken
    for r in (probs.gather(1, tokens[:, None]).flatten() <= 0).nonzero().flatten().tolist():
        massive = (probs[r] > 0).nonzero().flatten()
        earlier = massive[massive <= tokens[r]]
        tokens[r] = earlier[-1] if len(earlier) else massive[0]
    return tokens


def _logprobs(logits: torch.Tensor, tokens: list[int],
              seqs: list[Sequence]) -> list[TokenLogprob | None]:
    """Each asking row's chosen token and its `logprobs` most likely tokens, as log-probabilities
    (one gather and one top-k over all the rows)."""
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return out
    logp = torch.log_softmax(_rows(logits, wanted), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted])).flatten().tolist()
    most = max(seqs[i].params.logprobs for i in wanted)
    values, ids = logp.topk(most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(wanted):
        n = seqs[i].params.logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(ids[j][:n], values[j][:n])))
    return out
