"""The served cluster with `store.client: node`: both workers of this one-node Ray cluster attach to
one node store client over shared memory, hand KV off through it, and answer like the engine offline.
The spec also turns on n-gram speculative decoding: the decode worker speculates after the handoff,
and the stock client still gets the engine's plain greedy text."""
from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

import cluster_harness as h
from pdcluster.actors.node_client_supervisor import node_client_name
from pdcluster.actors.names import NAMESPACE
from pdcluster.cluster.supervised_process import free_port
from pdcluster.cluster.kvstore.node_client import free_transfer_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Name three rivers in Europe and one fact about each."}]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def cluster():
    import ray

    spec = h.small_spec(store={"client": "node", "node_client_port": free_port(),
                               "node_client_transfer_port": free_transfer_port()},
                        engine={"speculative_config": NGRAM})
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             resources={"pd_prefill": 1, "pd_decode": 1})  # our own Ray, even if another one runs
    try:
        yield spec, h.serve_cluster(spec)
    finally:
        h.stop_cluster()
    # the router's shutdown stops the node client it did not start itself
    flag = f"--port={spec.store.node_client_port}".encode()
    deadline = time.monotonic() + 15
    while any(flag in c and b"mooncake_client" in c for c in _cmdlines()):
        assert time.monotonic() < deadline, "mooncake_client outlived the cluster"
        time.sleep(0.2)


def _cmdlines() -> list[bytes]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            out.append((proc / "cmdline").read_bytes())
        except OSError:  # not a process, or gone meanwhile
            pass
    return out


def test_handoff_through_the_node_client_equals_offline(cluster, llm):
    import ray

    spec, base = cluster
    h.assert_stream_equals_offline(base, llm, QUESTION)       # `llm` does not speculate

    snap = h.wait_idle()  # reports taken after the request
    assert {w.info.role for w in snap.workers} == {"prefill", "decode"}
    assert all(w.info.kv_store for w in snap.workers)
    stats = {w.info.role: w.report.stats for w in snap.workers}
    prompt_blocks = -(-len(llm.chat_prompt(QUESTION)) // spec.engine.block_size)
    assert stats["prefill"]["kv_blocks_saved"] == prompt_blocks
    assert stats["decode"]["kv_blocks_loaded"] == prompt_blocks  # every block came through the store
    assert stats["decode"]["kv_recomputed_tokens"] == 0
    metrics = httpx.get(base + "/metrics").text
    assert "pdcluster_kv_handoff_bytes_total 0.0" not in metrics
    # the decode worker drafted (this answer repeats enough of itself) and exports its counters
    drafted = stats["decode"]["spec_draft_tokens_total"]
    assert drafted > 0
    decode_id = next(w.info.worker_id for w in snap.workers if w.info.role == "decode")
    exported = re.search(rf'pdcluster_spec_draft_tokens_total{{role="decode",worker="{decode_id}"}} '
                         r"([0-9.]+)", metrics)
    assert exported and 0 < float(exported.group(1)) <= drafted
    # one node client serves both workers of the node
    supervisor = ray.get_actor(node_client_name("127.0.0.1", spec.store.node_client_port),
                               namespace=NAMESPACE)
    status = ray.get(supervisor.start.remote())
    assert status.healthy and status.restarts == 0
    assert status.segment == f"127.0.0.1:{spec.store.node_client_transfer_port}"
