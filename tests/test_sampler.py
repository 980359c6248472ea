"""Sampler filters on hand-made distributions: top-k and top-p keep exactly the intended tokens."""
from __future__ import annotations

import math

import torch

from pdcluster.engine.sampler import _filtered_probs, sample
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
