"""The production shape on one machine: a head plus 2 prefill and 4 decode Ray nodes
(ray.cluster_utils.Cluster). Workers land on the nodes of their pool, the router and the Mooncake master
on the head, concurrent requests are spread over the whole decode pool, and a stream outlives the
loss of its decode or prefill worker, which Ray then restarts."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import cluster_harness as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFILL_NODES, DECODE_NODES = 2, 4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    roles = {}
    for role, count in (("pd_prefill", PREFILL_NODES), ("pd_decode", DECODE_NODES)):
        for _ in range(count):
            node = nodes.add_node(num_cpus=1, resources={role: 1})
            roles[node.node_id] = role
    ray.init(address=nodes.address)
    spec = h.small_spec(engine={"num_kv_blocks": 64}, prefill={"replicas": PREFILL_NODES},
                        decode={"replicas": DECODE_NODES})
    try:
        yield spec, h.serve_cluster(spec), roles, nodes.head_node.node_id
    finally:
        h.stop_cluster()
        nodes.shutdown()


def test_workers_land_on_their_pool_nodes_and_the_control_plane_on_the_head(cluster):
    import ray

    _, _, roles, head = cluster
    info = ray.get(h.controller().ready.remote(), timeout=60)
    on = {w.worker_id: w.node_id for w in info.workers.values()}
    assert sorted(on) == ["decode-0", "decode-1", "decode-2", "decode-3", "prefill-0", "prefill-1"]
    for worker_id, node_id in on.items():
        assert roles.get(node_id) == f"pd_{worker_id.split('-')[0]}", worker_id
    assert len(set(on.values())) == PREFILL_NODES + DECODE_NODES  # one worker per node
    assert info.controller_node_id == head and ray.get(info.router.node_id.remote(), timeout=30) == head
    assert info.master.node_id == head and info.master.healthy and info.master.managed


async def _concurrent(base: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json={
            "model": h.MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 12,
            "ignore_eos": True, "temperature": 0}) for i in range(n)))


def test_concurrent_requests_are_spread_over_the_decode_pool(cluster):
    _, base, _, _ = cluster
    responses = asyncio.run(_concurrent(base, 2 * DECODE_NODES))
    assert [r.status_code for r in responses] == [200] * (2 * DECODE_NODES)
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in responses)
    def decoded(snap) -> dict[str, int]:
        return {w.info.worker_id: w.report.stats["computed_tokens_total"] for w in snap.workers
                if w.info.role == "decode" and w.report is not None}

    snap = h.wait_idle()  # by reports taken after the requests ran
    assert len(decoded(snap)) == DECODE_NODES and all(n > 0 for n in decoded(snap).values())
    placed = {w.info.worker_id: w.placed_total for w in snap.workers}
    assert [placed[f"decode-{i}"] for i in range(DECODE_NODES)] == [2] * DECODE_NODES
    assert all(placed[f"prefill-{i}"] >= 1 for i in range(PREFILL_NODES))


def test_a_stream_survives_the_loss_of_its_decode_worker(cluster):
    """Kill the decode worker's engine process in the middle of a stream: the worker goes with it,
    the request continues on another decode worker after the tokens already sent, and the client
    gets the same greedy text, once."""
    _, base, _, _ = cluster
    body = {"model": h.MODEL, "prompt": "The history of the printing press", "max_tokens": 40,
            "ignore_eos": True, "temperature": 0}
    def decode_placements() -> int:
        return sum(w.placed_total for w in h.snapshot().workers if w.info.role == "decode")

    reference = httpx.post(base + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    placed = decode_placements()
    text, killed = "", None
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True},
                      timeout=300) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            text += json.loads(line[5:])["choices"][0]["text"]
            if killed is None and len(text) > 10:
                killed = next(w.info.worker_id for w in h.snapshot().workers
                              if w.info.role == "decode" and w.assigned)
                _crash(killed, process="engine")
    assert killed is not None
    assert text == reference
    assert decode_placements() == placed + 2  # the stream's own placement and its move
    snap = h.wait_idle()
    assert not next(w for w in snap.workers if w.info.worker_id == killed).healthy
    _wait_restarted(killed)


def _crash(worker_id: str, process: str = "worker") -> None:
    """SIGKILL the worker's actor process, or its engine's process, as a crash or the OOM killer
    would: either way the worker dies (Ray then restarts it) and so does the other process."""
    import os
    import signal

    (info,) = [w.info for w in h.snapshot().workers if w.info.worker_id == worker_id]
    assert info.engine_pid, "the engine runs in its own process by default"
    os.kill(info.pid if process == "worker" else info.engine_pid, signal.SIGKILL)
    survivor = info.engine_pid if process == "worker" else info.pid
    h.wait_for(lambda: not _alive(survivor), timeout_s=30, interval_s=0.1)


def _alive(pid: int) -> bool:
    from pathlib import Path
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_restarted(worker_id: str) -> None:
    """Ray restarts a killed worker (its engine reloads); the router's poll marks it healthy again."""
    h.wait_for(lambda: next(w for w in h.snapshot().workers if w.info.worker_id == worker_id).healthy,
               timeout_s=240, interval_s=1.0)


def test_a_prompt_survives_the_loss_of_its_prefill_worker(cluster):
    """Kill the prefill worker while it runs a long prompt: the prompt is run again on the other
    prefill worker and the client gets one normal answer (the same greedy text as a clean run)."""
    import threading

    _, base, _, _ = cluster
    body = {"model": h.MODEL, "prompt": " ".join(f"item {i}," for i in range(120)),  # ~500 tokens
            "max_tokens": 8, "temperature": 0}
    def prefill_placements() -> int:
        return sum(w.placed_total for w in h.snapshot().workers if w.info.role == "prefill")

    def running_prefill() -> str | None:
        return next((w.info.worker_id for w in h.snapshot().workers
                     if w.info.role == "prefill" and w.assigned), None)

    killed: list[str] = []

    def kill_it() -> None:
        killed.append(h.wait_for(running_prefill, timeout_s=60, interval_s=0.05))
        _crash(killed[0])

    placed = prefill_placements()
    killer = threading.Thread(target=kill_it)
    killer.start()
    resp = httpx.post(base + "/v1/completions", json=body, timeout=300)
    killer.join()
    assert resp.status_code == 200, resp.text
    assert prefill_placements() == placed + 2  # its own placement and its move
    reference = httpx.post(base + "/v1/completions", json=body, timeout=300).json()
    assert resp.json()["choices"][0]["text"] == reference["choices"][0]["text"]
    h.wait_idle()
    _wait_restarted(killed[0])
