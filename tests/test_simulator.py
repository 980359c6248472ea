"""Discrete-event simulator: hand-computed timelines on toy profiles, the real admission/routing in the
loop, speculative tokens, the EP pool in the loop, and the sweep over splits and decode choices."""
from __future__ import annotations

import dataclasses

import pytest

from pdcluster.cluster.policy.admission import AdmissionConfig
from pdcluster.cluster.tools.planner.decode import DecodeModel, Speculative
from pdcluster.cluster.tools.planner.hardware import Hardware, ModelArch
from pdcluster.cluster.tools.planner.prefill import PrefillModel
from pdcluster.cluster.tools.planner.profile import HandoffModel, Profile
from pdcluster.cluster.tools.simulator import Topology, Workload, simulate, sweep_splits

# A toy model whose terms are easy to compute by hand: one MoE layer, 2 routed experts (top-1) of 3
# one-byte weights each, nothing else; 6 FLOPs per token at 6e-9 TFLOP/s = 1 ms per prompt token;
# HBM 1e-6 GB/s = 1 byte per ms.
TOY_ARCH = ModelArch("toy", layers=1, dense_layers=0, hidden=1, dense_intermediate=1, routed_experts=2,
                     experts_per_token=1, shared_experts=0, moe_intermediate=1, heads=0, q_lora_rank=0,
                     kv_lora_rank=0, qk_nope_dim=0, qk_rope_dim=0, v_head_dim=0, vocab=0, mtp_layers=1,
                     weight_bytes=1.0, head_bytes=1.0, kv_bytes=1.0)
TOY_HW = Hardware("toy", chips_per_node=1, peak_tflops=6e-9, hbm_gb_s=1e-6, intra_node_gb_s=1.0,
                  inter_node_gb_s=1.0, a2a_latency_us=0.0)


def toy(expert_ms_per_byte: float = 0.0) -> Profile:
    # prefill = 100 ms + 1 ms/token; decode step = 12 ms (+ expert_ms_per_byte x expert bytes read;
    # decode FLOPs ~0 at mfu 1e30);
    # handoff = 5 ms + 1e6 B/token at 1 GB/s = 5 ms + 1 ms/token.
    eff = 1 / expert_ms_per_byte if expert_ms_per_byte else 1e30
    return Profile("toy", TOY_HW, TOY_ARCH, PrefillModel(100.0, 0.0, mfu=1.0), DecodeModel(12.0, eff, 1.0, mfu=1e30),
                   HandoffModel(1e6, 1.0, 5.0), max_batch_seqs=64, kv_blocks=1000, block_size=16)


def test_single_request_timeline():
    r = simulate(toy(), Topology(colocated_nodes=1), Workload(1, input_len=10, output_len=4,
                                                                requests_per_client=1))
    (t,) = r.traces
    assert t.token_times == pytest.approx([0.110, 0.122, 0.134, 0.146])  # prefill 110 ms, then 12 ms steps
    assert r.stats.ttft_p50_s == pytest.approx(0.110) and r.stats.tpot_p50_ms == pytest.approx(12.0)


def test_colocated_prefill_interrupts_decode():
    # Client 0 starts at 0, client 1 at 0.05 s while client 0 is prefilling. At 0.11 the node prefills
    # client 1 (0.11..0.22) before decoding again, so client 0's second token waits 110 + 12 ms.
    r = simulate(toy(), Topology(colocated_nodes=1), Workload(2, 10, 20, 1, start_stagger_s=0.05))
    first, second = sorted(r.traces, key=lambda t: t.start)
    assert first.token_times[:3] == pytest.approx([0.110, 0.232, 0.244])
    assert second.ttft == pytest.approx(0.22 - 0.05)
    assert second.token_times[1] == pytest.approx(0.232)  # joins the same decode batch


def test_disaggregated_decode_is_not_interrupted():
    # Same arrivals on 1P1D: client 0's KV reaches the decode node at 0.110 + 0.015 and its tokens then
    # come every 12 ms while the prefill node works on client 1; client 1's KV arrives at 0.235, in the
    # middle of the step 0.233..0.245, so it joins the next one.
    r = simulate(toy(), Topology(prefill_nodes=1, decode_nodes=1), Workload(2, 10, 20, 1, start_stagger_s=0.05))
    first, second = sorted(r.traces, key=lambda t: t.start)
    assert first.token_times[:3] == pytest.approx([0.110, 0.137, 0.149])
    assert first.itl[1:] == pytest.approx([0.012] * 18)
    assert second.ttft == pytest.approx(0.17)
    assert second.token_times[1] == pytest.approx(0.257)
    assert r.nodes["prefill0"].decode_steps == 0 and r.nodes["decode0"].prefill_steps == 0


def test_real_admission_queues_and_rejects():
    queued = simulate(toy(), Topology(colocated_nodes=1), Workload(2, 10, 4, 1),
                      AdmissionConfig(max_concurrency=1, max_queue=1))
    late = max(queued.traces, key=lambda t: t.token_times[0])
    assert late.ttft == pytest.approx(0.146 + 0.110)  # waits for the first request's slot

    rejected = simulate(toy(), Topology(colocated_nodes=1), Workload(2, 10, 4, 2),
                        AdmissionConfig(max_concurrency=1, max_queue=0, min_retry_after_s=1.0))
    assert rejected.rejected == 1 and len(rejected.traces) == 4
    assert rejected.stats.ok == 3
    retry = [t for t in rejected.traces if t.ok and t.start == pytest.approx(1.0)]
    assert len(retry) == 1 and retry[0].ttft == pytest.approx(0.110)  # the client came back after 1 s


def test_2p4d_spreads_32_clients_8_per_decode_node():
    r = simulate(toy(expert_ms_per_byte=2.0), Topology(prefill_nodes=2, decode_nodes=4), Workload(32, 10, 6, 1))
    assert {n: s.max_batch for n, s in r.nodes.items() if n.startswith("decode")} == {f"decode{i}": 8 for i in range(4)}
    assert all(r.nodes[f"prefill{i}"].prefill_steps == 1 for i in range(2))  # 16 prompts batched each
    # TTFT = prefill of 16 x 10 tokens = 100 + 160 ms. A decode step at batch 8 reads the distinct
    # experts 8 tokens touch, 2 x (1 - 1/2^8), of 3 bytes at 2 ms per byte; TPOT = (15 ms handoff +
    # 5 steps) / 5.
    step = 12 + 2 * (1 - 0.5 ** 8) * 3 * 2.0
    assert r.stats.ttft_p99_s == pytest.approx(0.260)
    assert r.stats.tpot_p50_ms == pytest.approx((15 + 5 * step) / 5)


def test_speculative_steps_emit_the_mean_accepted_length():
    # k=1 at acceptance 0.5: 1.5 tokens per step, emitted 1, 2, 1, 2, ... (the fraction carries over).
    # A step = one verification pass + one draft pass of the MTP layer (the toy's only layer), 12 ms
    # overhead each, reads ~0.
    spec = toy().with_decode(speculative=Speculative(1, (0.5,)))
    r = simulate(spec, Topology(colocated_nodes=1), Workload(1, 10, 7, 1))
    (t,) = r.traces
    assert t.token_times == pytest.approx([0.110, 0.134, 0.158, 0.158, 0.182, 0.206, 0.206])


def test_ep_pool_in_the_loop_and_not_colocated():
    # 64 experts (top-1) over 4 decode chips; 32 sequences on the pool, 8 per node. A step reads the
    # chip's share of the distinct experts all 32 tokens touch, 64 (1 - (63/64)^32) / 4, 3 bytes each
    # at 2 ms per byte; the all-to-all (8 tokens x 2 B at 1 GB/s) hides under the reads.
    arch = dataclasses.replace(TOY_ARCH, routed_experts=64)
    p = dataclasses.replace(toy(expert_ms_per_byte=2.0), model=arch).with_decode("ep")
    r = simulate(p, Topology(prefill_nodes=2, decode_nodes=4), Workload(32, 10, 6, 1))
    step = 12 + 64 * (1 - (63 / 64) ** 32) / 4 * 3 * 2.0
    assert r.stats.tpot_p50_ms == pytest.approx((15 + 5 * step) / 5)
    with pytest.raises(ValueError, match="colocated"):
        simulate(p, Topology(colocated_nodes=2), Workload(2, 10, 6, 1))


def test_sweep_lists_every_split_and_decode_choice_best_first():
    base = toy(expert_ms_per_byte=2.0)
    rows = sweep_splits([base, base.with_decode("ep")], 4, Workload(8, 10, 6, 1), slo_tpot_ms=30)
    labels = sorted(f"{t.label} {p.decode_label}" for t, p, _ in rows)
    assert labels == ["1P3D ep", "1P3D tp", "2P2D ep", "2P2D tp", "3P1D ep", "3P1D tp", "4 colocated tp"]
    keys = [(s.goodput_rps, s.tps) for _, _, s in rows]
    assert keys == sorted(keys, reverse=True)
