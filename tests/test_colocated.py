"""The colocated baseline (`prefill.replicas: 0`): decode workers compute prompts themselves, behind
the same router and API, and give the same greedy text as the engine offline and as PD."""
from __future__ import annotations

import httpx
import pytest

import cluster_harness as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Give me two tips for learning to cook."}]


@pytest.fixture(scope="module")
def cluster():
    import ray

    # engine.threads unset, as in a user's spec; Ray offers 2 CPUs, as many threads as the offline
    # engine (conftest) uses
    spec = h.small_spec(prefill={"replicas": 0}, engine={"threads": None})
    assert spec.colocated
    ray.init(num_cpus=2, include_dashboard=False, resources={"pd_decode": 1})
    try:
        yield spec, h.serve_cluster(spec)
    finally:
        h.stop_cluster()


def test_colocated_stream_equals_offline_and_uses_no_prefill_worker(cluster, llm):
    spec, base = cluster
    h.assert_stream_equals_offline(base, llm, QUESTION)
    snap = h.snapshot()
    assert {w.info.role for w in snap.workers} == {"decode"}
    assert snap.in_flight == 0
    metrics = httpx.get(base + "/metrics").text
    # TTFT is measured from the decode worker's first token; no KV crossed the store
    assert "pdcluster_ttft_seconds_count 1.0" in metrics
    assert "pdcluster_kv_handoff_bytes_total 0.0" in metrics


def test_the_colocated_worker_runs_on_all_its_nodes_cores(cluster):
    import os

    (worker,) = h.snapshot().workers
    # the one worker on this machine: every core Ray offers it (not half, as when PD shares a node)
    assert worker.info.threads == min(len(os.sched_getaffinity(0)), 2)


def test_colocated_router_learns_prefill_rate_from_the_decode_workers_counters(cluster):
    from pdcluster.cluster.policy.admission import AdmissionConfig

    prior = AdmissionConfig().prefill_tok_s_prior
    snap = h.wait_for(lambda: (s := h.snapshot()).prefill_tok_s != prior and s)
    (stats,) = [w.report.stats for w in snap.workers if w.report is not None]
    assert stats["prefill_tokens_total"] > 0 and stats["prefill_seconds_total"] > 0
    measured = stats["prefill_tokens_total"] / stats["prefill_seconds_total"]
    # an average of what the worker measured, pulled from the prior towards it
    assert min(prior, measured) * 0.5 <= snap.prefill_tok_s <= max(prior, measured) * 2


def test_the_worker_actor_leaves_torch_to_its_engine_process(cluster, llm):
    spec, base = cluster
    h.assert_stream_equals_offline(base, llm, QUESTION)   # after serving, not only after start-up
    (worker,) = h.snapshot().workers

    def maps_torch(pid: int) -> bool:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch_cpu" in f.read()

    # the actor (Ray calls, output streams, store manifests) runs without torch's few hundred MB;
    # only the engine's own process loads it
    assert worker.info.engine_pid and worker.info.pid != worker.info.engine_pid
    assert maps_torch(worker.info.engine_pid)
    assert not maps_torch(worker.info.pid)
