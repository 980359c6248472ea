"""Tensor-parallel workers on real Ray and a real mooncake_master: prefill and decode each run two
gloo ranks (the actor and one follower process), the KV of every rank crosses the store under its
own keys, greedy completions equal one offline rank's, and a killed follower takes its worker down
(instead of hanging it) until Ray has restarted it."""
from __future__ import annotations

import os
import signal

import openai
import pytest

import cluster_harness as h
import model_factory as mf
from pdcluster.engine import LLM, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TP = 2
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 4 attention heads and 2 kv heads: one kv head per rank (SmolLM2's 9 heads do not split in 2)
    return mf.save_model(mf.llama_config(num_attention_heads=4, num_key_value_heads=2),
                         tmp_path_factory.mktemp("tp-workers") / "llama", seed=3)


@pytest.fixture(scope="module")
def cluster(model):
    import ray

    spec = h.small_spec(model={"path": str(model)},
                        engine={"tp_size": TP, "threads": 1, "num_kv_blocks": 64})
    ray.init(num_cpus=4, include_dashboard=False, resources={"pd_prefill": 1, "pd_decode": 1})
    try:
        yield spec, h.serve_cluster(spec)
    finally:
        h.stop_cluster()


def prompts() -> list[list[int]]:
    # 2 to 4 blocks of 16, the last one partial: full and partial blocks both cross the store
    return [p for p in mf.prompts(seed=5) if len(p) > 16][:3]


def test_tp2_prefill_and_decode_match_one_rank_with_kv_through_the_store(cluster, model):
    import ray

    from pdcluster.actors.names import NAMESPACE

    spec, base = cluster
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    workers = h.snapshot().workers
    assert all(len(w.info.tp_pids) == TP - 1 and w.info.kv_store for w in workers)

    offline = LLM(model=str(model), block_size=spec.engine.block_size, num_kv_blocks=64).generate(
        prompts(), SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, want in zip(prompts(), offline):
        got = client.completions.create(model="llama", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == MAX_TOKENS

    h.wait_idle()  # slots released, every block free on both workers
    # asked directly: the router's polled copy may predate the last request
    reports = {w: ray.get(ray.get_actor(w, namespace=NAMESPACE).report.remote(), timeout=30)
               for w in ("prefill-0", "decode-0")}
    assert all(r.free_blocks == r.total_blocks for r in reports.values())
    stats = {w: r.stats for w, r in reports.items()}
    blocks = sum(-(-len(p) // spec.engine.block_size) for p in prompts())
    assert stats["prefill-0"]["kv_blocks_saved"] == blocks
    # decode loaded every block, every rank agreed on it, and nothing was recomputed
    assert stats["decode-0"]["kv_blocks_loaded"] == blocks
    assert stats["decode-0"]["kv_recomputed_tokens"] == 0
    assert stats["decode-0"]["kv_corrupt_blocks"] == stats["decode-0"]["kv_missing_blocks"] == 0


def test_a_killed_follower_fails_its_worker_which_ray_restarts(cluster, model):
    _, base = cluster
    decode = next(w for w in h.snapshot().workers if w.info.worker_id == "decode-0")
    os.kill(decode.info.tp_pids[0], signal.SIGKILL)
    # the worker exits with its follower (rather than hang in a collective); the router stops
    # using it, Ray restarts it with a new follower, and it serves again once a poll answers
    h.wait_for(lambda: not _decode_worker().healthy, timeout_s=30)
    back = h.wait_for(lambda: (w := _decode_worker()).healthy and w.info.pid != decode.info.pid
                      and w, timeout_s=180, interval_s=1.0)
    assert back.info.tp_pids and back.info.tp_pids != decode.info.tp_pids
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = LLM(model=str(model), num_kv_blocks=64).generate(
        prompts()[:1], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    got = client.completions.create(model="llama", prompt=prompts()[0], max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def _decode_worker():
    return next(w for w in h.snapshot().workers if w.info.worker_id == "decode-0")
