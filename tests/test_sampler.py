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
