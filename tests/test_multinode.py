"""The production shape on one machine: a head plus 2 prefill and 4 decode Ray nodes
(ray.cluster_utils.Cluster). Workers land on the nodes of their pool, the router and the Mooncake master
on the head, concurrent requests are spread over the whole decode pool, and a stream outlives the
loss of its decode worker."""
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
    info = ray.get(h.router().ready.remote(), timeout=60)
    on = {w.worker_id: w.node_id for w in info.workers.values()}
    assert sorted(on) == ["decode-0", "decode-1", "decode-2", "decode-3", "prefill-0", "prefill-1"]
    for worker_id, node_id in on.items():
        assert roles.get(node_id) == f"pd_{worker_id.split('-')[0]}", worker_id
    assert len(set(on.values())) == PREFILL_NODES + DECODE_NODES  # one worker per node
    assert info.router_node_id == head
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
    snap = h.wait_for(lambda: s if h.idle(s := h.snapshot()) else None)
    placed = {w.info.worker_id: w.placed_total for w in snap.workers}
    assert [placed[f"decode-{i}"] for i in range(DECODE_NODES)] == [2] * DECODE_NODES
    assert all(placed[f"prefill-{i}"] >= 1 for i in range(PREFILL_NODES))
    # and the decode engines really ran them: every one of them computed tokens
    decoded = {w.info.worker_id: w.report.stats["computed_tokens_total"] for w in snap.workers
               if w.info.role == "decode"}
    assert all(n > 0 for n in decoded.values()), decoded


def test_a_stream_survives_the_loss_of_its_decode_worker(cluster):
    """Kill the decode worker in the middle of a stream: the request continues on another decode
    worker after the tokens already sent, and the client gets the same greedy text, once."""
    import ray

    _, base, _, _ = cluster
    body = {"model": h.MODEL, "prompt": "The history of the printing press", "max_tokens": 40,
            "ignore_eos": True, "temperature": 0}
    def decode_placements() -> int:
        return sum(w.placed_total for w in h.snapshot().workers if w.info.role == "decode")

    reference = httpx.post(base + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    placed = decode_placements()
    handles = ray.get(h.router().ready.remote(), timeout=60).handles
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
                ray.kill(handles[killed])
    assert killed is not None
    assert text == reference
    assert decode_placements() == placed + 2  # the stream's own placement and its move
    snap = h.wait_for(lambda: s if h.idle(s := h.snapshot()) else None)
    assert not next(w for w in snap.workers if w.info.worker_id == killed).healthy
