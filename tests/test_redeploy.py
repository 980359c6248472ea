"""A redeploy with a changed spec, without Ray: which changes a running cluster takes live, and a
router reconfigured in place keeps its running and queued requests under the new limits."""
from __future__ import annotations

import asyncio

import pytest
from pdcluster.actors.router import Router
from pdcluster.actors.worker import WorkerInfo
from pdcluster.cluster.spec import ClusterSpec, SpecChangeRefused


def _spec(**sections) -> ClusterSpec:
    return ClusterSpec.from_dict({"engine": {"device": "cpu"}, **sections})


def test_router_and_serve_changes_are_live_the_rest_needs_new_workers() -> None:
    old = _spec(router={"max_concurrency": 4})
    live = _spec(router={"max_concurrency": 8, "per_key_limits": {"t": 2}}, serve={"max_body_bytes": 2048})
    assert old.changed_fields(live) == ["router.max_concurrency", "router.per_key_limits.t",
                                        "serve.max_body_bytes"]
    assert old.fields_needing_restart(live) == []
    fixed = _spec(router={"max_concurrency": 8}, engine={"device": "cpu", "max_num_seqs": 3},
                  decode={"replicas": 2})
    assert old.fields_needing_restart(fixed) == ["decode.replicas", "engine.max_num_seqs"]
    assert old.changed_fields(old) == []
    old.check_redeploy(live)
    with pytest.raises(SpecChangeRefused, match=r"cannot change decode.replicas, engine.max_num_seqs in"):
        old.check_redeploy(fixed)


def test_serve_fields_that_ray_reads_at_start_need_a_new_ray() -> None:
    """Serve reads its proxy mode and HAProxy's ports when Ray's processes start: a redeploy cannot
    change them (the replacing ingress would refuse the running Ray, leaving no replica)."""
    old = _spec()
    moved = _spec(serve={"http_proxy": "haproxy", "haproxy_metrics_port": 9201, "max_body_bytes": 2048})
    assert old.fields_needing_restart(moved) == ["serve.haproxy_metrics_port", "serve.http_proxy"]
    with pytest.raises(SpecChangeRefused, match="serve.haproxy_metrics_port, serve.http_proxy in place"):
        old.check_redeploy(moved)


def _router(max_concurrency: int) -> Router:
    spec = _spec(router={"max_concurrency": max_concurrency, "max_queue": 4})
    infos = [WorkerInfo(worker_id=w, role=w.split("-")[0], node_id="n", node_ip="127.0.0.1", pid=1,
                        max_model_len=4096, vocab_size=100, block_size=16, num_total_blocks=256,
                        block_nbytes=1, max_num_seqs=8, model_fingerprint="m", kv_store=True)
             for w in ("prefill-0", "decode-0")]
    return Router(spec.to_dict(), infos)


def test_a_reconfigured_router_keeps_its_requests_and_admits_queued_ones_into_new_slots() -> None:
    router = _router(max_concurrency=1)
    wider = _spec(router={"max_concurrency": 3, "max_queue": 4}).to_dict()

    async def scenario():
        assert (await router.admit("r1", 32, 8, [])).admitted
        queued = [asyncio.ensure_future(router.admit(f"q{i}", 32, 8, [])) for i in range(3)]
        await asyncio.sleep(0)
        assert (router.snapshot().in_flight, router.snapshot().queued) == (1, 3)
        router.reconfigure(wider, 1)
        done, pending = await asyncio.wait(queued, timeout=1)
        return [t.result() for t in done], pending

    admitted, pending = asyncio.run(scenario())
    assert len(admitted) == 2 and all(a.admitted and a.decode_worker == "decode-0" for a in admitted)
    assert len(pending) == 1
    snap = router.snapshot()
    assert (snap.in_flight, snap.queued) == (3, 1) and router.spec.router.max_concurrency == 3


def test_a_restarted_router_takes_the_redeployed_spec_from_the_controllers_poll() -> None:
    router = _router(max_concurrency=1)  # Ray re-runs __init__ with the spec it was created with
    redeployed = _spec(router={"max_concurrency": 5, "max_queue": 4}).to_dict()
    router.update_workers(list(router.infos.values()), dict(router.healthy), {}, redeployed, 2)
    assert router.admission.config.max_concurrency == 5
    stale = _spec(router={"max_concurrency": 1, "max_queue": 4}).to_dict()  # a poll sent before
    router.update_workers(list(router.infos.values()), dict(router.healthy), {}, stale, 1)
    assert router.admission.config.max_concurrency == 5

    async def five():
        return [await router.admit(f"r{i}", 32, 8, []) for i in range(5)]

    assert all(a.admitted for a in asyncio.run(five()))
