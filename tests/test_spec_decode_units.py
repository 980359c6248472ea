"""Speculative decoding without a model: n-gram drafting, adaptive draft length, the exactness of
verification (greedy and rejection sampling), scheduling of drafts, block trimming, config checks."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from pdcluster.cluster.spec import ClusterSpec, SpecError
from pdcluster.engine.block_manager import BlockManager
from pdcluster.engine.config import EngineConfig, SpeculativeConfig
from pdcluster.engine.sampling import SamplingParams
from pdcluster.engine.scheduler import Scheduler
from pdcluster.engine.sequence import Sequence
from pdcluster.engine.spec_decode.adaptive import MAX_PAUSE, DraftState
from pdcluster.engine.spec_decode.ngram import NgramDrafter
from pdcluster.engine.spec_decode.rejection import accept_greedy, accept_sampled, verify


# ------------------------------------------------------------------ drafter
def test_ngram_prefers_the_longest_suffix_match():
    d = NgramDrafter(prompt_lookup_max=3, prompt_lookup_min=1)
    # suffix [2, 3] occurs at 1..2 (followed by 4, 5); the unigram [3] also at 6 (followed by 9)
    assert d.propose([1, 2, 3, 4, 5, 3, 9, 2, 3], 2) == [4, 5]
    assert d.propose([1, 2, 3, 4, 5, 1, 2, 3], 4) == [4, 5, 1, 2]


def test_ngram_takes_the_latest_occurrence_and_stops_at_the_end():
    d = NgramDrafter(prompt_lookup_max=2, prompt_lookup_min=2)
    assert d.propose([7, 8, 1, 7, 8, 2, 7, 8], 3) == [2, 7, 8]
    assert d.propose([7, 8, 1, 2, 7, 8], 9) == [1, 2, 7, 8]


def test_ngram_proposes_nothing_below_the_minimum():
    d = NgramDrafter(prompt_lookup_max=4, prompt_lookup_min=2)
    assert d.propose([1, 2, 3, 9, 3], 4) == []           # only a 1-gram repeats
    assert d.propose([5, 6], 4) == []
    assert d.propose([1, 2, 1, 2], 0) == []


# ------------------------------------------------------------------ adaptive
def test_draft_length_backs_off_and_pauses_when_rejected():
    state = DraftState()
    assert state.num_drafts(4) == 4
    paused_steps = 0
    for _ in range(200):
        n = state.num_drafts(4)
        if n == 0:
            paused_steps += 1
        else:
            assert n <= 4
            state.record(n, 0)
    assert paused_steps > 150                 # the pauses grew to MAX_PAUSE
    assert state.next_pause == MAX_PAUSE
    state.paused = 0
    state.record(1, 1)                        # an accepted draft ends the growing pauses
    assert state.num_drafts(4) >= 1 and state.next_pause < MAX_PAUSE


# ------------------------------------------------------------------ verification
def test_greedy_accepts_the_agreeing_prefix_then_the_target_token():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]      # all accepted, bonus token
    assert accept_greedy([5, 9, 7], [5, 6]) == [5, 9]         # second rejected: target's token
    assert accept_greedy([4, 6, 7], [5, 6]) == [4]
    assert accept_greedy([3], []) == [3]


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def _chi2(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    support = [t for t in range(len(probs)) if probs[t] > 0]
    assert all(t in support for t in counts)               # never a token the target excludes
    stat = sum((counts.get(t, 0) - n * float(probs[t])) ** 2 / (n * float(probs[t])) for t in support)
    return stat, len(support) - 1


def test_rejection_sampling_reproduces_the_target_distribution():
    """Every emitted position must be distributed as the target's p at that position, whatever the
    draft: the first token ~ p0; given it equals draft 0, the second ~ p1; and so on."""
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0],
                          [0.25, 0.05, 0.0, 0.3, 0.4],
                          [0.2, 0.2, 0.2, 0.2, 0.2]])
    drafts = [2, 3]                                        # p0(2) = 0.3, p1(3) = 0.3
    g = torch.Generator().manual_seed(1234)
    n = 12000
    first, second, third = Counter(), Counter(), Counter()
    for _ in range(n):
        out = accept_sampled(probs, drafts, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        if len(out) > 2:
            third[out[2]] += 1
    for counts, p in ((first, probs[0]), (second, probs[1]), (third, probs[2])):
        total = sum(counts.values())
        assert total > 500
        stat, dof = _chi2(counts, p, total)
        assert stat < CHI2_001[dof], (counts, p)
    # each draft is accepted with probability p(draft): 0.3, then 0.3 again
    assert abs(first[2] / n - 0.3) < 0.02 and abs(second[3] / first[2] - 0.3) < 0.03


def test_rejection_sampling_edge_drafts():
    g = torch.Generator().manual_seed(0)
    sure = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    impossible = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    for _ in range(50):
        out = accept_sampled(sure, [1], g)
        assert out[0] == 1 and out[1] in (0, 2)
        assert accept_sampled(impossible, [0], g)[0] in (1, 2)


def test_verify_splits_rows_per_sequence_and_reports_target_logprobs():
    vocab = 6
    logits = torch.full((4, vocab), -5.0)
    for row, tok in enumerate([3, 4, 1, 2]):     # seq a: rows 0-2 (2 drafts), seq b: row 3
        logits[row, tok] = 5.0
    a = Sequence("a", [1], SamplingParams(temperature=0, logprobs=1))
    b = Sequence("b", [1], SamplingParams(temperature=0))
    tokens, logprobs = verify(logits, [a, b], [[3, 0], []])
    assert tokens == [[3, 4], [2]]
    expected = torch.log_softmax(logits[1], -1)[4]
    assert [lp.token_id for lp in logprobs[0]] == [3, 4]
    assert logprobs[0][1].logprob == pytest.approx(float(expected))
    assert logprobs[1] == [None]


# ------------------------------------------------------------------ scheduling and blocks
def _decoding(rid: str, bm: BlockManager, sch: Scheduler, prompt: int = 6) -> Sequence:
    s = Sequence(rid, list(range(prompt)), SamplingParams())
    sch.add(s)
    for sc in sch.schedule().scheduled:
        sc.seq.num_computed_tokens += sc.num_tokens
        sc.seq.token_ids.append(7)
    return s


def test_drafts_are_cut_to_the_budget_and_never_preempt():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    a, b = _decoding("a", bm, sch), _decoding("b", bm, sch)   # 7 tokens each: 2 blocks each
    assert bm.num_free_blocks == 0
    a.draft_token_ids = [1, 2, 3]        # would need a third block: dropped, b is not preempted
    b.draft_token_ids = [1]              # fits in b's second block
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 2)]
    assert not out.preempted and a.draft_token_ids == [] and out.scheduled[1].completes

    bm2 = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    sch2 = Scheduler(bm2, max_num_seqs=4, max_num_batched_tokens=4)
    c = _decoding("c", bm2, sch2, prompt=3)
    c.draft_token_ids = [1, 2, 3, 4, 5]
    out = sch2.schedule()
    assert out.scheduled[0].num_tokens == 4 and c.draft_token_ids == [1, 2, 3]


def test_trim_returns_draft_blocks_first_in_line():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = Sequence("s", list(range(6)), SamplingParams())
    assert bm.admit(s, 6) and bm.reserve(s, 14)             # room for 8 draft positions
    assert len(s.block_table) == 4
    extra = s.block_table[2:]
    bm.trim(s, 7)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    assert set(list(bm.free)[:2]) == set(extra)              # reused before older free blocks


# ------------------------------------------------------------------ configuration
def test_speculative_config_validation():
    cfg = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                           "prompt_lookup_max": 5, "prompt_lookup_min": 1})
    assert cfg.speculative_config == SpeculativeConfig("ngram", 3, 5, 1)
    assert EngineConfig().speculative_config is None
    for bad, match in [({"method": "mtp"}, "not implemented"), ({"method": "eagle"}, "unknown method"),
                       ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "exceeds"),
                       ({"prompt_lookup_min": 0}, "prompt_lookup_min"),
                       ({"num_speculative_tokens": 2.5}, "integer"), ({"k": 2}, "unknown keys")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(speculative_config=bad)
    with pytest.raises(ValueError, match="mapping"):
        EngineConfig(speculative_config=4)


def test_cluster_spec_passes_speculative_config_to_the_engine():
    spec = ClusterSpec.from_dict({"engine": {"device": "cpu", "speculative_config": {
        "method": "ngram", "num_speculative_tokens": 5}}})
    assert spec.engine_config().speculative_config == SpeculativeConfig(num_speculative_tokens=5)
    assert ClusterSpec.default().engine_config().speculative_config is None
    with pytest.raises(SpecError, match="engine.speculative_config.*not implemented"):
        ClusterSpec.from_dict({"engine": {"speculative_config": {"method": "mtp"}}})
