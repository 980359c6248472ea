"""The router's TTFT predictor learns the prefill pool's throughput from the workers' counters
(prompt tokens and the time of the steps that computed them, as deltas between polls), in
disaggregated and colocated mode, so an SLO check admits what the pool can serve in time."""
from __future__ import annotations

import asyncio

import pytest
from pdcluster.actors.router import Router
from pdcluster.actors.worker import WorkerInfo, WorkerReport
from pdcluster.cluster.spec import ClusterSpec

TRUE_TOK_S = 2000.0  # each worker computes prompts at this rate while it prefills


def _info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=worker_id.split("-")[0], node_id="n", node_ip="127.0.0.1",
                      pid=1, max_model_len=8192, vocab_size=100, block_size=16, num_total_blocks=4096,
                      block_nbytes=1, max_num_seqs=64, model_fingerprint="m", kv_store=True)


def _learn(worker_ids: list[str], prefilling: list[str], colocated: bool, polls: int = 30) -> Router:
    spec = ClusterSpec.from_dict({"prefill": {"replicas": 0 if colocated else 1},
                                  "router": {"ttft_slo_s": 2.0}})
    infos = [_info(w) for w in worker_ids]
    router = Router(spec.to_dict(), infos)
    tokens = dict.fromkeys(worker_ids, 0)
    seconds = dict.fromkeys(worker_ids, 0.0)
    for _ in range(polls):
        # Busy 0.3 s of every 0.5 s poll, with batches of queued prompts: per request, tokens over
        # arrival-to-first-token would be a fraction of the rate; the counters' deltas are not.
        for w in prefilling:
            tokens[w] += int(TRUE_TOK_S * 0.3)
            seconds[w] += 0.3
        router.update_workers(infos, dict.fromkeys(worker_ids, True), {
            w: WorkerReport(w, infos[i].role, 0, 0, 4096, 4096,
                            {"prefill_tokens_total": tokens[w], "prefill_seconds_total": seconds[w]})
            for i, w in enumerate(worker_ids)})
    return router


@pytest.mark.parametrize("workers, prefilling, colocated, pool_tok_s", [
    (["prefill-0", "decode-0"], ["prefill-0"], False, TRUE_TOK_S),
    (["prefill-0", "prefill-1", "decode-0"], ["prefill-0", "prefill-1"], False, 2 * TRUE_TOK_S),
    (["decode-0"], ["decode-0"], True, TRUE_TOK_S),  # colocated: decode computes the prompts
], ids=["1P1D", "2P1D", "colocated"])
def test_prefill_rate_is_learnt_from_worker_counters(workers, prefilling, colocated, pool_tok_s):
    router = _learn(workers, prefilling, colocated)
    assert router.snapshot().prefill_tok_s == pytest.approx(pool_tok_s, rel=0.02)


def test_slo_admits_what_the_learnt_rate_can_serve():
    router = _learn(["prefill-0", "decode-0"], ["prefill-0"], colocated=False)
    # 3000 tokens at 2000 tok/s is 1.5 s, inside the 2 s SLO; 5000 tokens (2.5 s) is not.
    assert asyncio.run(router.admit("fits", 3000, 8, [])).admitted
    router.prefill_done("fits")  # its prompt is no longer work ahead of newcomers
    late = asyncio.run(router.admit("late", 5000, 8, []))
    assert not late.admitted and late.reason == "ttft_slo"
