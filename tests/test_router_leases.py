"""The router's leases and restarts without Ray: a request's slot belongs to the ingress replica that
admitted it and is freed when that replica stops renewing; a restarted (empty) router counts the
running requests again from the ingress replicas' descriptions."""
from __future__ import annotations

import asyncio

import pytest
from pdcluster.actors import router as router_mod
from pdcluster.actors.router import LEASE_TTL_S, LeasedRequest, Router
from pdcluster.actors.worker import WorkerInfo
from pdcluster.cluster.spec import ClusterSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(router_mod.time, "monotonic", c)
    return c


def _router(max_concurrency: int = 2) -> Router:
    spec = ClusterSpec.from_dict({"router": {"max_concurrency": max_concurrency, "max_queue": 4}})
    infos = [WorkerInfo(worker_id=w, role=w.split("-")[0], node_id="n", node_ip="127.0.0.1", pid=1,
                        max_model_len=4096, vocab_size=100, block_size=16, num_total_blocks=256,
                        block_nbytes=1, max_num_seqs=8, model_fingerprint="m", kv_store=True)
             for w in ("prefill-0", "decode-0")]
    return Router(spec.to_dict(), infos)


def _admit(router: Router, rid: str, owner: str):
    return asyncio.run(router.admit(rid, 32, 8, [], None, owner))


def test_a_silent_ingress_loses_its_requests_and_a_renewing_one_keeps_them(clock):
    router = _router()
    assert _admit(router, "a1", "ingress-a").admitted and _admit(router, "b1", "ingress-b").admitted
    assert router.snapshot().in_flight == 2
    for _ in range(3):  # b keeps renewing, a has died
        clock.now += LEASE_TTL_S / 2
        assert router.renew("ingress-b", ["b1"]) == []
    assert "a1" not in router.requests and "b1" in router.requests
    snap = router.snapshot()
    assert snap.in_flight == 1 and router.expired_total == 1
    assert all(len(w.info.worker_id) and w.assigned == 1 for w in snap.workers)  # only b1's
    # The freed slot is usable: a new request runs at once (max_concurrency is 2).
    assert _admit(router, "c1", "ingress-b").admitted and router.snapshot().in_flight == 2


def test_an_expired_lease_frees_queued_requests_too(clock):
    router = _router(max_concurrency=1)

    async def scenario():
        assert (await router.admit("a1", 32, 8, [], None, "ingress-a")).admitted
        queued = asyncio.ensure_future(router.admit("a2", 32, 8, [], None, "ingress-a"))
        await asyncio.sleep(0)
        assert router.snapshot().queued == 1
        clock.now += LEASE_TTL_S + 1
        router.snapshot()  # the expiry runs on any renewal or snapshot
        return await queued

    assert asyncio.run(scenario()).reason == "cancelled"
    assert (router.snapshot().in_flight, router.snapshot().queued) == (0, 0)


def test_a_restarted_router_counts_running_requests_again_from_the_leases(clock):
    fresh = _router()
    running = [LeasedRequest("r1", 40, 8, ["h1"], None, "prefill-0", "decode-0", prefilled=True),
               LeasedRequest("r2", 50, 8, [], None, "prefill-0", "decode-0", prefilled=False)]
    assert fresh.renew("ingress-a", ["r1", "r2"]) == ["r1", "r2"]
    fresh.release("r2")  # finished while its description was on the way: must not be counted
    assert fresh.restore("ingress-a", running) == 1
    assert fresh.renew("ingress-a", ["r1"]) == []
    snap = fresh.snapshot()
    assert snap.in_flight == 1
    assert {w.info.worker_id: w.assigned for w in snap.workers} == {"prefill-0": 0, "decode-0": 1}
    fresh.release("r1")
    assert fresh.snapshot().in_flight == 0
    # The restored request held a slot like any other: with max_concurrency 2 and two restored,
    # a third waits.
    fresh.restore("ingress-a", [LeasedRequest(f"s{i}", 8, 8, [], None, None, "decode-0", True)
                                for i in range(2)])
    assert fresh.snapshot().in_flight == 2
    assert router_mod.Verdict.QUEUE == fresh.admission.admit("t", 8, 8, clock.now).verdict


def test_a_request_its_live_ingress_stopped_listing_is_released(clock):
    """The ingress's release() can be lost (Ray may drop a call made while the request's task is
    being cancelled): the replica's renewals stop listing it and the router frees its slot, but
    never a request admitted just before a renewal that was already on its way."""
    router = _router()
    assert _admit(router, "a1", "ingress-a").admitted and _admit(router, "a2", "ingress-a").admitted
    # a renewal sent before a2's admission answered: a2 is too young to be missing
    router.renew("ingress-a", ["a1"])
    clock.now += 1
    router.renew("ingress-a", ["a1"])
    assert "a2" in router.requests
    # a2 ended at the ingress but its release never came; a1 is still listed
    for _ in range(3):
        clock.now += 1
        router.renew("ingress-a", ["a1"])
    assert "a2" not in router.requests and "a1" in router.requests
    snap = router.snapshot()
    assert snap.in_flight == 1 and snap.orphans_total == 1
    assert [w.assigned for w in snap.workers] == [1, 1]
    # another replica's renewals never release ingress-a's requests
    for _ in range(4):
        clock.now += 1
        router.renew("ingress-b", [])
        router.renew("ingress-a", ["a1"])
    assert "a1" in router.requests
    # a late release of the orphan changes nothing
    router.release("a2")
    assert router.snapshot().in_flight == 1
