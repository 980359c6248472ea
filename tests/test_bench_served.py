"""The served-vs-offline report: ratios to the offline engine, the goals judged at the right
concurrencies, and peers called ahead or behind, on hand-made levels."""
from __future__ import annotations

from pdcluster.cluster.tools.bench_served import (OfflineLevel, format_pd_share, format_vs_offline,
                                                  format_vs_peers)
from pdcluster.cluster.policy.engine_threads import EXPAND_FROM_SEQS
from pdcluster.cluster.tools.perf_metrics import LevelStats, RequestTrace, summarize

OFFLINE = [OfflineLevel(1, 20.0, 45.0), OfflineLevel(8, 30.0, 200.0), OfflineLevel(32, 60.0, 300.0)]


def _level(conc: int, tpot_ms: float, throughput: float) -> LevelStats:
    base = summarize([RequestTrace(0.0, [0.1, 0.2])], conc)
    return LevelStats(**{**base.to_dict(), "concurrency": conc, "tpot_mean_ms": tpot_ms,
                         "throughput_tok_s": throughput})


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_served_ratios_and_goals():
    served = {"pd": [_level(1, 22.0, 40.0), _level(8, 50.0, 150.0), _level(32, 200.0, 280.0)],
              "colocated": [_level(1, 30.0, 30.0), _level(32, 150.0, 250.0)]}
    rows = _rows(format_vs_offline(OFFLINE, served))
    assert [(r[0], r[1]) for r in rows] == [("pd", "1"), ("pd", "8"), ("pd", "32"), ("colocated", "1"),
                                            ("colocated", "32")]
    # TPOT over the offline step and throughput over the offline throughput, at the same batch
    assert [(r[4], r[6]) for r in rows] == [("1.10", "0.89"), ("1.67", "0.75"), ("3.33", "0.93"),
                                            ("1.50", "0.67"), ("2.50", "0.83")]
    goals = [r[7] for r in rows]
    assert goals[0] == "TPOT met (<= 1.15x)" and goals[1] == ""
    assert goals[2] == "throughput met (>= 0.9x)"
    assert goals[3] == "TPOT missed (<= 1.15x)" and goals[4] == "throughput missed (>= 0.9x)"


def test_peers_ahead_or_behind():
    ours = {"pd": [_level(1, 20.0, 50.0), _level(8, 40.0, 90.0), _level(32, 100.0, 120.0)]}
    peers = {"llama.cpp": [_level(1, 11.0, 67.0), _level(8, 54.0, 99.0), _level(32, 229.0, 98.0)]}
    rows = _rows(format_vs_peers(ours, peers))
    assert [(r[2], r[3], r[4], r[5]) for r in rows] == [
        ("1", "0.75", "0.55", "behind"),
        ("8", "0.91", "1.35", "behind on throughput, ahead on TPOT"),
        ("32", "1.22", "2.29", "ahead")]


def test_pd_against_the_offline_engine_on_its_share():
    served = {"pd": [_level(1, 8.0, 100.0), _level(8, 30.0, 200.0)], "pd-split": [_level(1, 7.7, 99.0)],
              "colocated": [_level(1, 9.0, 90.0)]}
    served["pd-si8"] = [_level(1, 6.0, 150.0)]   # its batch-1 steps take both cores: not on the share
    table = format_pd_share(1, [OfflineLevel(1, 7.0, 120.0)], served, wide=["pd-si8"])
    assert f"fewer than {EXPAND_FROM_SEQS} sequences" in table and "(1 thread here)" in table
    # only PD deployments, only at the batches measured on the share
    assert [(r[0], r[1], r[3], r[4]) for r in _rows(table.split("\n\n", 1)[1])] == [
        ("pd", "1", "7.0", "1.14"), ("pd-split", "1", "7.0", "1.10")]
