"""Sampler filters on hand-made distributions: top-k and top-p keep exactly the intended tokens."""
from __future__ import annotations

import math

import pytest
import torch
from pdcluster.engine.sampler import _filtered_probs, process_logits, sample
from pdcluster.engine.sampling import SamplingParams
from pdcluster.engine.sequence import Sequence

PROBS = [0.4, 0.3, 0.2, 0.1]


def seq(**kw) -> Sequence:
    return Sequence("s", [1], SamplingParams(**kw))


def logits() -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in PROBS]])


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = _filtered_probs(logits(), [seq(top_p=0.5)])[0]
    assert torch.allclose(probs, torch.tensor([0.4 / 0.7, 0.3 / 0.7, 0, 0]))
    probs = _filtered_probs(logits(), [seq(top_p=0.3)])[0]     # first token alone reaches 0.3
    assert torch.allclose(probs, torch.tensor([1.0, 0, 0, 0]))


def test_extreme_values_sample_the_top_token_instead_of_nan():
    # top_p 1e-300 is 0 in float32 and 1e-45 a subnormal temperature: both once gave NaN
    # probabilities, failing the step of every sequence in the batch.
    ss = [seq(top_p=1e-300, seed=1), seq(temperature=1e-45, seed=2), seq(temperature=1e-5, seed=3)]
    assert not ss[0].params.greedy and ss[1].params.greedy and not ss[2].params.greedy
    assert torch.equal(_filtered_probs(logits(), ss[:1])[0], torch.tensor([1.0, 0, 0, 0]))
    tokens, _ = sample(logits().repeat(3, 1), ss)
    assert tokens == [0, 0, tokens[2]] and 0 <= tokens[2] < len(PROBS)


def test_top_k_and_temperature():
    probs = _filtered_probs(logits(), [seq(top_k=3)])[0]
    assert torch.allclose(probs, torch.tensor([0.4, 0.3, 0.2, 0]) / 0.9)
    hot = _filtered_probs(logits(), [seq(temperature=2.0)])[0]
    expected = torch.tensor(PROBS).sqrt() / torch.tensor(PROBS).sqrt().sum()
    assert torch.allclose(hot, expected)


def test_rows_are_filtered_independently_and_draws_follow_the_distribution():
    rows = torch.cat([logits(), logits()])
    probs = _filtered_probs(rows, [seq(top_k=1), seq(top_p=1.0)])
    assert torch.allclose(probs[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(probs[1], torch.tensor(PROBS))
    s = seq(temperature=1.0, seed=0)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[sample(logits(), [s])[0][0]] += 1
    assert torch.allclose(counts / 2000, torch.tensor(PROBS), atol=0.04)


def test_logprobs_are_of_the_unscaled_distribution():
    tokens, lps = sample(logits(), [seq(temperature=0, logprobs=2)])
    assert tokens == [0]
    assert math.isclose(lps[0].logprob, math.log(0.4), rel_tol=1e-5)
    assert [t for t, _ in lps[0].top] == [0, 1]


def _seq_with_history(prompt: list[int], output: list[int], **kw) -> Sequence:
    s = Sequence("s", prompt, SamplingParams(temperature=0, **kw))
    s.token_ids += output
    return s


def test_penalties_match_a_hand_computation():
    # vocab of 5; prompt [1], generated [0, 0, 2]: token 0 twice, token 2 once, token 1 in the prompt
    raw = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    s = _seq_with_history([1], [0, 0, 2], presence_penalty=0.5, frequency_penalty=0.25,
                          repetition_penalty=2.0)
    got = process_logits(raw, [s])[0]
    # repetition (prompt + output, HF): positive / 2, negative * 2; then OpenAI:
    # logit - frequency * count - presence * (count > 0), over the generated tokens only
    expected = [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2, 0.5 / 2 - 0.25 - 0.5, 3.0, -2.0]
    assert got.tolist() == pytest.approx(expected)
    assert raw.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0]]     # the raw logits are left alone
    plain = _seq_with_history([1], [0, 0, 2])
    both = process_logits(raw.repeat(2, 1), [plain, s])     # rows are processed independently
    assert both[0].tolist() == raw[0].tolist() and both[1].tolist() == pytest.approx(expected)


def test_penalties_match_transformers_and_openais_formula_on_many_rows():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    gen = torch.Generator().manual_seed(4)
    vocab, seqs, want = 50, [], []
    raw = torch.randn(6, vocab, generator=gen) * 3
    for row in range(6):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (), generator=gen)),), generator=gen).tolist()
        output = torch.randint(0, vocab, (int(torch.randint(0, 30, (), generator=gen)),), generator=gen).tolist()
        rep, freq, pres = 1.0 + 0.2 * row, 0.3 * (row % 3), -0.5 + 0.4 * (row % 2)
        seqs.append(_seq_with_history(prompt, output, repetition_penalty=rep, frequency_penalty=freq,
                                      presence_penalty=pres))
        x = raw[row:row + 1].clone()
        if rep != 1.0:   # transformers': over prompt and output
            x = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([prompt + output]), x)
        count = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()
        want.append(x[0] - freq * count - pres * (count > 0).float())
    got = process_logits(raw, seqs)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    # bench_sampler's baseline penalizes alike
    from pdcluster.cluster.tools.bench_sampler import dense_penalties
    dense = raw.clone()
    dense_penalties(dense, seqs, torch.arange(6), vocab)
    assert torch.allclose(dense, torch.stack(want), atol=1e-6)


def test_logit_bias_min_tokens_and_logprobs_of_the_raw_distribution():
    raw = logits()
    forced = seq(temperature=0, logit_bias={3: 100.0}, logprobs=1)
    banned = seq(temperature=0, logit_bias={0: -100.0})
    tokens, lps = sample(raw.repeat(2, 1), [forced, banned])
    assert tokens == [3, 1]
    assert lps[0].logprob == pytest.approx(math.log(0.1), rel=1e-5)   # before the bias, as vLLM
    # EOS (and stop_token_ids) cannot end the request before min_tokens
    early = Sequence("s", [1], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(1,)))
    assert sample(raw, [early], eos_token_ids={0})[0] == [2]
    early.token_ids += [2, 2]
    assert sample(raw, [early], eos_token_ids={0})[0] == [0]


def _reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               min_p: float = 0.0) -> torch.Tensor:
    """transformers' warpers in vLLM's order (temperature, min-p, top-k, top-p), then softmax."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("candidates", [256, 4])
def test_filtered_probs_match_transformers_warpers(monkeypatch, candidates):
    # 4 candidates make almost every nucleus reach past the first look: the widening path
    monkeypatch.setattr("pdcluster.engine.sampler.CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(0)
    vocab = 3000
    settings = [(t, k, p, m) for t in (0.3, 1.0, 1.7) for k in (0, 1, 7, 50, 700)
                for p in (1.0, 0.05, 0.5, 0.9, 0.999) for m in (0.0, 0.002, 0.1)]
    # peaked rows and flat ones: nuclei of a few tokens and of most of the vocabulary
    logits = torch.randn(len(settings), vocab, generator=gen) * torch.tensor(
        [4.0 if i % 2 else 0.5 for i in range(len(settings))])[:, None]
    seqs = [seq(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in settings]
    got = _filtered_probs(logits, seqs)
    for row, case in enumerate(settings):
        want = _reference(logits[row:row + 1], *case)[0]
        assert not got[row][want == 0].any(), case           # nothing outside the cut
        assert (got[row][want > 1e-12] > 0).all(), case     # nothing inside it lost
        assert torch.allclose(got[row], want, atol=1e-6), case


def test_the_cut_depends_on_the_rows_values_alone_when_tokens_tie():
    # bfloat16 logits tie often: which of the tied tokens a top-k returns depends on how many it is
    # asked for, and that must not make a row's cut (and its seed's draw) depend on its neighbours
    gen = torch.Generator().manual_seed(2)
    raw = (torch.randn(4, 2000, generator=gen) * 2).bfloat16().float()
    settings = [dict(top_k=10), dict(top_p=0.9), dict(top_k=40, top_p=0.7), dict(temperature=0.5, top_k=3)]
    neighbour = seq(top_k=1500)
    for row, kw in enumerate(settings):
        alone = _filtered_probs(raw[row:row + 1], [seq(**kw)])[0]
        beside = _filtered_probs(torch.stack([raw[row], raw[0]]), [seq(**kw), neighbour])[0]
        assert torch.equal(alone, beside), kw
    # transformers' top-k keeps every token tied with the k-th
    want = _reference(raw[:1], 1.0, 10, 1.0)[0]
    assert torch.allclose(_filtered_probs(raw[:1], [seq(top_k=10)])[0], want, atol=1e-6)
    assert (want > 0).sum() >= 10


def test_a_row_without_finite_mass_is_an_error_not_a_token():
    from pdcluster.engine.sampler import draw
    for bad in (float("nan"), float("inf")):
        probs = torch.rand(2, 300)
        probs[1, 7] = bad
        with pytest.raises(ValueError):
            draw(probs, [None, None])
    with pytest.raises(ValueError):
        draw(torch.zeros(1, 300), [None])


def test_top_p_is_over_the_top_k_set_renormalized():
    # top-2 renormalized is [0.57, 0.43]: 0.57 already reaches top_p 0.5 (over the whole
    # vocabulary 0.4 would not, and the second token would stay)
    probs = _filtered_probs(logits(), [seq(top_k=2, top_p=0.5)])[0]
    assert torch.allclose(probs, torch.tensor([1.0, 0, 0, 0]))


def test_draws_follow_the_distribution_and_never_take_a_token_without_mass():
    from pdcluster.engine.sampler import draw
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros_like(probs)
    for _ in range(4000):
        tokens = draw(probs, [gen, gen])
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    assert torch.equal(counts > 0, probs > 0)        # an unnormalized row too
    assert torch.allclose(counts[0] / 4000, probs[0], atol=0.03)


def test_a_uniform_at_the_top_of_its_range_takes_the_last_token_with_mass(monkeypatch):
    from pdcluster.engine import sampler
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]])
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **kw: torch.tensor(1.0, dtype=torch.float64))
    assert sampler.draw(probs, [None, None]).tolist() == [1, 2]


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch():
    vocab = 1000
    raw = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))

    def run(batch: list[int]) -> list[int]:
        seqs = [seq(temperature=1.0, top_p=0.9, seed=7)] + [seq(temperature=1.0, seed=i) for i in batch]
        out = []
        for _ in range(20):
            out.append(sample(raw[:1 + len(batch)], seqs)[0][0])
        return out

    assert run([]) == run([11, 12]) == run([13])


def test_the_benchmark_baseline_samples_what_the_engine_samples():
    # bench_sampler times the engine's sampler against a plain torch one: same distributions, or the
    # comparison is not of the same work
    from pdcluster.cluster.tools.bench_sampler import reference_sample
    raw = torch.log(torch.tensor([[0.05, 0.4, 0.25, 0.2, 0.1]])).repeat(3, 1)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.6), dict(temperature=1.3, top_k=3, top_p=0.8)]
    for sampler in (sample, reference_sample):
        seqs = [seq(seed=5, **kw) for kw in settings]
        counts = torch.zeros(3, 5)
        for _ in range(3000):
            for row, token in enumerate(sampler(raw, seqs)[0]):
                counts[row, token] += 1
        want = torch.stack([_reference(raw[:1], kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))[0]
                            for kw in settings])
        assert torch.allclose(counts / 3000, want, atol=0.03), sampler
