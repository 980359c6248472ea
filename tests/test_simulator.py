"""Discrete-event simulator: hand-computed timelines on toy profiles, the real admission/routing in the
loop, fitting, and the accuracy of a fit on 2 measured concurrencies against the other 4."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdcluster.cluster.policy.admission import AdmissionConfig
from pdcluster.cluster.cli.main import main
from pdcluster.cluster.cli.simulate import ASCEND_910B_HBM_GB_S, ASCEND_910B_ROCE_GB_S, DSR1_KV_BYTES_PER_TOKEN
from pdcluster.cluster.tools.perf_metrics import format_table
from pdcluster.cluster.tools.simulator import (DecodeModel, HandoffModel, PrefillModel, Profile, Topology, Workload,
                                         fit_profile, load_profile, read_measurements, save_profile, simulate,
                                         simulate_levels, sweep_splits)

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO.parent / "shared" / "data" / "910b_dsr1_awq_8card_128in.csv"
DEPLOYED = REPO / "deploy" / "profiles" / "910b_dsr1_awq_tp8.yaml"


def toy(batch_coef_ms: float = 0.0) -> Profile:
    # prefill = 100 ms + 1 ms/token; decode step = 12 ms (+ batch_coef x batch);
    # handoff = 5 ms + 1e6 B/token at 1 GB/s = 5 ms + 1 ms/token.
    return Profile("toy", PrefillModel(100.0, 1.0), DecodeModel(12.0, batch_coef_ms, 1.0, 0.0),
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
    r = simulate(toy(batch_coef_ms=2.0), Topology(prefill_nodes=2, decode_nodes=4), Workload(32, 10, 6, 1))
    assert {n: s.max_batch for n, s in r.nodes.items() if n.startswith("decode")} == {f"decode{i}": 8 for i in range(4)}
    assert all(r.nodes[f"prefill{i}"].prefill_steps == 1 for i in range(2))  # 16 prompts batched each
    # TTFT = prefill of 16 x 10 tokens = 100 + 160 ms; TPOT = (15 ms handoff + 5 steps of 12 + 2 x 8 ms) / 5.
    assert r.stats.ttft_p99_s == pytest.approx(0.260)
    assert r.stats.tpot_p50_ms == pytest.approx((15 + 5 * 28) / 5)


def test_sweep_lists_every_split_best_first():
    rows = sweep_splits(toy(batch_coef_ms=2.0), 4, Workload(8, 10, 6, 1), slo_tpot_ms=30)
    assert sorted(t.label for t, _ in rows) == ["1P3D", "2P2D", "3P1D", "4 colocated"]
    keys = [(s.goodput_rps, s.tps) for _, s in rows]
    assert keys == sorted(keys, reverse=True)


def _rows(beta: float, conc: list[int]) -> list[dict[str, float]]:
    ctx_ms = 70272 / 1600e9 * 1000
    return [{"concurrency": c, "tpot_ms": 10 + 5 * c ** beta + ctx_ms * c * (128 + 256),
             "ttft_s": (300 + 0.25 * 128 * c) / 1000} for c in conc]


def _fit(rows, **kw) -> Profile:
    return fit_profile(rows, 128, 512, kv_bytes_per_token=70272, hbm_gb_s=1600,
                       handoff=HandoffModel(70272, 25, 2.0), **kw)


def test_fit_recovers_known_parameters():
    p = _fit(_rows(0.6, [1, 2, 4, 8, 16, 32]))
    assert p.decode.batch_exponent == pytest.approx(0.6)
    assert p.decode.base_ms == pytest.approx(10, abs=0.01) and p.decode.batch_coef_ms == pytest.approx(5, abs=0.01)
    assert p.prefill.base_ms == pytest.approx(300) and p.prefill.per_token_ms == pytest.approx(0.25)
    two = _fit(_rows(0.5, [1, 8]))  # two points: exponent from the prior, both points reproduced
    assert two.fit["batch_exponent"] == "prior" and two.decode.batch_exponent == 0.5
    assert max(abs(e) for e in two.fit["tpot_rel_err"].values()) < 1e-4


def test_fit_on_two_concurrencies_predicts_the_others_within_15_percent():
    rows = read_measurements(MEASURED)
    profile = _fit([r for r in rows if r["concurrency"] in (1, 8)])
    held_out = {int(r["concurrency"]): r for r in rows if r["concurrency"] in (2, 4, 16, 32)}
    levels = simulate_levels(profile, Topology(colocated_nodes=1), sorted(held_out), 128, 512,
                             requests_per_client=2)
    errors = {lv.concurrency: lv.tpot_mean_ms / held_out[lv.concurrency]["tpot_ms"] - 1 for lv in levels}
    print("\n" + format_table(levels, title="colocated 1 node, fit on c=1,8 (simulated)"))
    print("| Conc. | measured TPOT (ms) | simulated | rel. error |\n|---|---|---|---|")
    for lv in levels:
        print(f"| {lv.concurrency} | {held_out[lv.concurrency]['tpot_ms']} | {lv.tpot_mean_ms:.1f} "
              f"| {100 * errors[lv.concurrency]:+.1f}% |")
    assert all(abs(e) <= 0.15 for e in errors.values()), errors


def test_profile_yaml_round_trip(tmp_path: Path):
    path = tmp_path / "p.yaml"
    save_profile(_fit(_rows(0.5, [1, 4, 8])), path)
    assert load_profile(path) == _fit(_rows(0.5, [1, 4, 8]))


def test_deployed_profile_is_the_fit_of_the_measurements():
    # Catches a stale deploy/profiles file after a change to the fit or the measurements.
    deployed = load_profile(DEPLOYED)
    refit = fit_profile(read_measurements(MEASURED), 128, 512, kv_bytes_per_token=DSR1_KV_BYTES_PER_TOKEN,
                        hbm_gb_s=ASCEND_910B_HBM_GB_S,
                        handoff=HandoffModel(DSR1_KV_BYTES_PER_TOKEN, ASCEND_910B_ROCE_GB_S, 2.0))
    assert (deployed.decode, deployed.prefill, deployed.handoff) == (refit.decode, refit.prefill, refit.handoff)


def test_cli_simulate_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "fitted.yaml"
    assert main(["simulate", "--fit", str(MEASURED), "--fit-concurrency", "1", "8",
                 "--write-profile", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["fit"]["concurrencies"] == [1, 8]
    assert main(["simulate", "--profile", str(out), "--prefill-nodes", "2", "--decode-nodes", "4",
                 "--concurrency", "32", "--requests-per-client", "1", "--min-tps", "30"]) == 0
    text = capsys.readouterr().out
    assert "2P4D" in text and "| 32 | 32/32 |" in text and "Largest simulated concurrency" in text
    assert main(["simulate", "--profile", str(out), "--sweep-splits", "3", "--concurrency", "4",
                 "--requests-per-client", "1", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert all(label in text for label in ("1P2D", "2P1D", "3 colocated"))
