"""Metric definitions on synthetic token streams whose answers are worked out by hand below."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from pdcluster.cluster.tools.perf_metrics import (LevelStats, RequestTrace, format_comparison, format_table,
                                    largest_concurrency_meeting_tps, levels_to_json, percentile, summarize)

# A: starts at 0, 5 tokens 0.1 s apart from 0.5 s.  B: starts at 1.0, 3 tokens 0.05 s apart from 1.2 s.
# C: failed at 0.2..0.4 without tokens.
A = RequestTrace(start=0.0, token_times=[0.5, 0.6, 0.7, 0.8, 0.9], prompt_tokens=10)
B = RequestTrace(start=1.0, token_times=[1.2, 1.25, 1.3], prompt_tokens=10)
C = RequestTrace(start=0.2, token_times=[], prompt_tokens=10, ok=False, error="HTTP 500", end=0.4)


def test_per_request_metrics():
    assert A.ttft == pytest.approx(0.5)
    assert A.tpot == pytest.approx(0.1)  # (0.9 - 0.5) / (5 - 1): the first token is excluded
    assert A.itl == pytest.approx([0.1] * 4)
    assert A.e2e == pytest.approx(0.9)
    assert B.tpot == pytest.approx(0.05) and B.e2e == pytest.approx(0.3)
    assert C.ttft is None and C.tpot is None and C.e2e == pytest.approx(0.2)
    one = RequestTrace(0.0, [0.3])
    assert one.tpot is None and one.ttft == pytest.approx(0.3)


def test_usage_token_count_overrides_chunk_count():
    # 3 chunks carried 5 tokens (the server batched some into one chunk): TPOT divides by 5 - 1.
    t = RequestTrace(0.0, [0.2, 0.4, 0.6], output_tokens=5, end=0.65)
    assert t.tpot == pytest.approx((0.65 - 0.2) / 4)  # to the end of the response, as evalscope
    assert t.e2e == pytest.approx(0.65)


def test_percentile_is_linear_interpolation_like_numpy():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(1 + 0.99 * 3)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    rng = random.Random(1)
    xs = [rng.expovariate(1.0) for _ in range(101)]
    for p in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_level_summary_by_hand():
    s = summarize([A, B, C], concurrency=2)
    assert (s.requests, s.ok) == (3, 2)
    assert s.ttft_p50_s == pytest.approx(0.35)  # between 0.2 and 0.5
    assert s.ttft_p99_s == pytest.approx(0.2 + 0.99 * 0.3)
    assert s.tpot_mean_ms == pytest.approx(75.0)
    assert s.tpot_p50_ms == pytest.approx(75.0)
    assert s.tps == pytest.approx(1000 / 75.0)
    assert s.output_tokens == 8
    assert s.duration_s == pytest.approx(1.3)  # first start 0.0 .. last finish 1.3
    assert s.throughput_tok_s == pytest.approx(8 / 1.3)
    assert s.e2e_p50_s == pytest.approx(0.6)
    assert s.goodput_rps == pytest.approx(2 / 1.3)  # no SLO: every successful request counts
    assert s.goodput_fraction == pytest.approx(2 / 3)  # the failed one counts against it


def test_goodput_under_slos():
    s = summarize([A, B, C], concurrency=2, slo_ttft_s=0.3)
    assert s.goodput_rps == pytest.approx(1 / 1.3) and s.goodput_fraction == pytest.approx(1 / 3)
    s = summarize([A, B, C], concurrency=2, slo_tpot_ms=60)
    assert s.goodput_fraction == pytest.approx(1 / 3)  # only B's 50 ms meets 60 ms
    s = summarize([A, B], concurrency=2, slo_ttft_s=0.1, slo_tpot_ms=200)
    assert s.goodput_rps == 0.0


def _level(conc: int, tps: float) -> LevelStats:
    base = summarize([A], conc)
    return LevelStats(**{**base.to_dict(), "tps": tps, "concurrency": conc})


def test_largest_concurrency_meeting_tps():
    levels = [_level(1, 40.0), _level(2, 31.0), _level(4, 29.9), _level(8, 12.0)]
    assert largest_concurrency_meeting_tps(levels, 30.0) == 2
    assert largest_concurrency_meeting_tps(levels, 12.0) == 8
    assert largest_concurrency_meeting_tps(levels, 50.0) is None
    assert largest_concurrency_meeting_tps([_level(1, math.nan)], 1.0) is None


def test_markdown_table_and_json():
    s = summarize([A, B, C], concurrency=2, slo_ttft_s=0.3)
    table = format_table([s], title="t")
    assert "| Conc. | OK/Req | TTFT p50/p99 (s) | TPOT mean/p50/p99 (ms) | per-req TPS | Output tok/s " \
           "| E2E p50/p99 (s) | Goodput (req/s, %) |" in table
    assert "| 2 | 2/3 | 0.350 / 0.497 | 75.0 / 75.0 / 99.5 | 13.3 | 6.2 | 0.60 / 0.89 | 0.77 (33%) |" in table
    empty = summarize([C], concurrency=1)
    doc = json.loads(json.dumps(levels_to_json([s, empty])))
    assert doc[0]["ttft_p50_s"] == pytest.approx(0.35) and doc[1]["ttft_p50_s"] is None
    assert "| 1 | 0/1 | - / - |" in format_table([empty])


def test_comparison_of_several_endpoints_gives_ratios_to_the_first():
    out = format_comparison({"pd": [_level(1, 40.0), _level(4, 30.0)], "colo": [_level(4, 15.0)],
                             "llama": [_level(1, 20.0), _level(4, 60.0)]})
    lines = out.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:2] == ["Conc.", "Endpoint"] and "per-req TPS x pd" in head
    tps, tps_ratio = head.index("per-req TPS"), head.index("per-req TPS x pd")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # by concurrency, then in the order given; an endpoint without a level is left out
    assert [(r[0], r[1]) for r in rows] == [("1", "pd"), ("1", "llama"), ("4", "pd"), ("4", "colo"),
                                            ("4", "llama")]
    assert [(r[tps], r[tps_ratio]) for r in rows] == [("40.0", "1.00"), ("20.0", "0.50"), ("30.0", "1.00"),
                                                      ("15.0", "0.50"), ("60.0", "2.00")]


def test_definitions_match_evalscope_perf():
    # evalscope perf (1.14): query_latency = last JSON chunk (the usage) - start; TPOT = (query_latency
    # - TTFT) / (completion_tokens - 1), completion_tokens from the usage; ITL = gaps between chunks
    # with content; output throughput = all completion tokens / (last completion - first start).
    # R1's usage arrives 0.05 s after its last token; R2's second chunk carried 2 tokens.
    r1 = RequestTrace(0.0, [0.4, 0.5, 0.6, 0.7], output_tokens=4, end=0.75)
    r2 = RequestTrace(0.1, [0.3, 0.5, 0.6], output_tokens=4, end=0.6)
    assert r1.tpot == pytest.approx((0.75 - 0.4) / 3) and r2.tpot == pytest.approx((0.6 - 0.3) / 3)
    assert r2.itl == pytest.approx([0.2, 0.1])
    s = summarize([r1, r2], concurrency=2)
    assert s.tpot_mean_ms == pytest.approx(1000 * ((0.35 / 3) + (0.3 / 3)) / 2)
    assert s.throughput_tok_s == pytest.approx(8 / 0.75)
    assert s.ttft_mean_s == pytest.approx((0.4 + 0.2) / 2)
