"""Admission control: exact admit/queue/reject counts, FIFO and fair release, TTFT-SLO prediction,
tenant (API key) limits, and no leaked slots."""
from __future__ import annotations

import pytest

from pdcluster.cluster.policy.admission import (QUEUE_FULL, TENANT_LIMIT, TTFT_SLO, AdmissionConfig,
                                         AdmissionController, Verdict)


def test_n_plus_q_plus_k_simultaneous_arrivals():
    n, q, k = 4, 3, 5
    ac = AdmissionController(AdmissionConfig(max_concurrency=n, max_queue=q, min_retry_after_s=2.0))
    decisions = [ac.admit(f"r{i}", 100, 10, now=0.0) for i in range(n + q + k)]
    verdicts = [d.verdict for d in decisions]
    assert verdicts == [Verdict.ADMIT] * n + [Verdict.QUEUE] * q + [Verdict.REJECT] * k
    assert all(d.reason == QUEUE_FULL and d.retry_after_s >= 2.0 for d in decisions[n + q:])
    assert (ac.in_flight, ac.queued) == (n, q)


def test_release_admits_queued_fifo_and_is_idempotent():
    ac = AdmissionController(AdmissionConfig(max_concurrency=2, max_queue=3))
    for i in range(5):
        ac.admit(f"r{i}", 10, 10, now=0.0)
    assert ac.release("r0", now=1.0) == ["r2"]
    assert ac.release("r0", now=1.5) == []  # second release of the same id changes nothing
    assert (ac.in_flight, ac.queued) == (2, 2)
    assert ac.release("r1", now=2.0) == ["r3"]
    for rid in ("r2", "r3", "r4"):
        ac.release(rid, now=3.0)
    assert (ac.in_flight, ac.queued) == (0, 0)


def test_cancel_removes_only_queued_requests():
    ac = AdmissionController(AdmissionConfig(max_concurrency=1, max_queue=2))
    for rid in ("a", "b", "c"):
        ac.admit(rid, 10, 10, now=0.0)
    assert ac.cancel("b") is True
    assert ac.cancel("b") is False
    assert ac.cancel("a") is False  # in flight: the caller must release it
    assert ac.release("c", now=0.5) == []  # releasing a queued id cancels it
    assert ac.queued == 0
    assert ac.release("a", now=1.0) == []  # nothing left to admit
    ac.admit("x", 1, 1, 0.0)
    with pytest.raises(ValueError):  # ids are unique while admitted or queued
        ac.admit("x", 1, 1, 0.0)


def test_queue_is_round_robin_across_tenants_fifo_within():
    ac = AdmissionController(AdmissionConfig(max_concurrency=1, max_queue=10))
    ac.admit("run", 10, 10, 0.0, tenant="A")
    for rid, tenant in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("b2", "B")):
        assert ac.admit(rid, 10, 10, 0.0, tenant=tenant).verdict is Verdict.QUEUE
    order = []
    last = "run"
    while ac.queued or ac.in_flight:
        nxt = ac.release(last, now=1.0)
        if not nxt:
            break
        order += nxt
        last = nxt[0]
    assert order == ["a1", "b1", "a2", "b2", "a3"]


def test_ttft_prediction_uses_observed_prefill_rate_and_work_ahead():
    cfg = AdmissionConfig(max_concurrency=8, max_queue=8, ttft_slo_s=0.8, prefill_tok_s_prior=1000.0,
                          ewma_alpha=1.0, min_retry_after_s=0.1)
    ac = AdmissionController(cfg)
    ac.observe_prefill(2000, 1.0)  # 2000 tok/s
    d1 = ac.admit("r1", 1000, 10, now=0.0)
    assert d1.verdict is Verdict.ADMIT and d1.predicted_ttft_s == pytest.approx(1000 / 2000)
    d2 = ac.admit("r2", 1000, 10, now=0.0)  # r1's 1000 unprefilled tokens are ahead: 2000 / 2000 = 1.0 s
    assert d2.verdict is Verdict.REJECT and d2.reason == TTFT_SLO
    assert d2.predicted_ttft_s == pytest.approx(1.0)
    assert d2.retry_after_s == pytest.approx(1.0 - 0.8)
    ac.observe_prefill(1000, 0.5, ["r1"])  # r1 prefilled; still 2000 tok/s
    d3 = ac.admit("r2", 1000, 10, now=0.6)
    assert d3.verdict is Verdict.ADMIT and d3.predicted_ttft_s == pytest.approx(0.5)


def test_queued_prediction_adds_slot_wait_from_observed_service_time():
    ac = AdmissionController(AdmissionConfig(max_concurrency=2, max_queue=4, prefill_tok_s_prior=100.0,
                                             ewma_alpha=1.0))
    ac.admit("r1", 50, 10, now=0.0)
    ac.release("r1", now=10.0)  # one request took 10 s: 2 slots free up at 2 / 10 s
    ac.admit("r2", 50, 10, now=10.0)
    ac.admit("r3", 50, 10, now=10.0)
    d = ac.admit("r4", 100, 10, now=10.0)
    # Queue position 1 waits 1 / (2 / 10 s) = 5 s, then r2's and r3's unprefilled 100 tokens and its own
    # 100 at 100 tok/s.
    assert d.verdict is Verdict.QUEUE and d.predicted_ttft_s == pytest.approx(5.0 + 200 / 100)
    full = AdmissionController(AdmissionConfig(max_concurrency=2, max_queue=0, min_retry_after_s=0.5))
    full.admit("a", 1, 1, 0.0)
    full.release("a", 8.0)
    for rid in ("b", "c"):
        full.admit(rid, 1, 1, 8.0)
    assert full.admit("d", 1, 1, 8.0).retry_after_s == pytest.approx(8.0 / 2)


def test_tenant_limits():
    cfg = AdmissionConfig(max_concurrency=10, max_queue=10, tenant_limits={"key-a": 2},
                          default_tenant_limit=3)
    ac = AdmissionController(cfg)
    assert [ac.admit(f"a{i}", 10, 10, 0.0, tenant="key-a").verdict for i in range(3)] == \
        [Verdict.ADMIT, Verdict.ADMIT, Verdict.REJECT]
    assert ac.admit("a9", 10, 10, 0.0, tenant="key-a").reason == TENANT_LIMIT
    assert [ac.admit(f"b{i}", 10, 10, 0.0, tenant="key-b").verdict for i in range(4)][-1] is Verdict.REJECT
    assert ac.admit("anon", 10, 10, 0.0).verdict is Verdict.ADMIT  # no tenant: no per-tenant cap
    ac.release("a0", now=1.0)
    assert ac.admit("a3", 10, 10, 1.0, tenant="key-a").verdict is Verdict.ADMIT


def test_tenant_limit_counts_queued_requests_too():
    ac = AdmissionController(AdmissionConfig(max_concurrency=1, max_queue=5, tenant_limits={"k": 2}))
    assert ac.admit("x", 10, 10, 0.0, tenant="other").verdict is Verdict.ADMIT
    assert ac.admit("k1", 10, 10, 0.0, tenant="k").verdict is Verdict.QUEUE
    assert ac.admit("k2", 10, 10, 0.0, tenant="k").verdict is Verdict.QUEUE
    assert ac.admit("k3", 10, 10, 0.0, tenant="k").reason == TENANT_LIMIT
    assert ac.cancel("k1")
    assert ac.admit("k3", 10, 10, 0.0, tenant="k").verdict is Verdict.QUEUE


def test_config_validation():
    with pytest.raises(ValueError):
        AdmissionConfig(max_concurrency=0)
    with pytest.raises(ValueError):
        AdmissionConfig(ewma_alpha=0.0)
