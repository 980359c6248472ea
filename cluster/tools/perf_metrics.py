"""Serving metrics as the field reports them (evalscope perf): TTFT, TPOT, per-request TPS, throughput,
end-to-end latency, goodput, from per-request token timestamps; plus the Markdown/JSON report.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

# Definitions, evalscope perf's (all times in seconds on one monotonic clock; n = output tokens of a
# request, from the server's usage when it reports one, else the number of chunks that carried text):
#   TTFT = first token time - start;  E2E = finish - start, where finish is when the response ended;
#   TPOT = (E2E - TTFT) / (n - 1), i.e. the first token is excluded; ITL = gaps between consecutive
#   streamed chunks; per-request TPS of a level = 1000 / mean TPOT in ms; system throughput = output
#   tokens of the level's successful requests / (last finish - first start).
#   Percentiles use linear interpolation between closest ranks (numpy's default, Hyndman-Fan type 7).
#   Goodput = successful requests with TTFT <= SLO and TPOT <= SLO, per second of the level and as a
#   fraction of all requests sent (failed ones count against it).


@dataclass(frozen=True)
class RequestTrace:
    start: float
    token_times: Sequence[float]  # arrival time of each streamed chunk that carried text
    prompt_tokens: int = 0
    ok: bool = True
    error: str | None = None
    output_tokens: int | None = None  # from the server's usage; defaults to len(token_times)
    end: float | None = None  # when the response completed; defaults to the last token time

    @property
    def n_output(self) -> int:
        return len(self.token_times) if self.output_tokens is None else self.output_tokens

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first, up to the end of the response; None with fewer
        than 2 tokens."""
        if not self.token_times or self.n_output < 2:
            return None
        return (self.finish - self.token_times[0]) / (self.n_output - 1)

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def finish(self) -> float:
        if self.end is not None:
            return self.end
        return self.token_times[-1] if self.token_times else self.start

    @property
    def e2e(self) -> float:
        return self.finish - self.start


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between closest ranks; nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class LevelStats:
    """One concurrency level's summary (the row of the report)."""

    concurrency: int
    requests: int
    ok: int
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    tpot_mean_ms: float
    tps: float  # per-request output tokens/s = 1000 / tpot_mean_ms
    throughput_tok_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens: int
    duration_s: float
    goodput_rps: float
    goodput_fraction: float
    slo_ttft_s: float | None = None
    slo_tpot_ms: float | None = None

    def to_dict(self) -> dict:
        # JSON has no NaN: empty metrics become null.
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def summarize(traces: Sequence[RequestTrace], concurrency: int, slo_ttft_s: float | None = None,
              slo_tpot_ms: float | None = None) -> LevelStats:
    ok = [t for t in traces if t.ok]
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    tpots_ms = [t.tpot * 1000 for t in ok if t.tpot is not None]
    e2es = [t.e2e for t in ok]
    out_tokens = sum(t.n_output for t in ok)
    duration = (max(t.finish for t in traces) - min(t.start for t in traces)) if traces else 0.0
    good = sum(1 for t in ok if _meets(t, slo_ttft_s, slo_tpot_ms))
    tpot_mean = _mean(tpots_ms)
    return LevelStats(
        concurrency=concurrency, requests=len(traces), ok=len(ok),
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), ttft_mean_s=_mean(ttfts),
        tpot_p50_ms=percentile(tpots_ms, 50), tpot_p99_ms=percentile(tpots_ms, 99), tpot_mean_ms=tpot_mean,
        tps=1000 / tpot_mean if tpot_mean > 0 else math.nan,
        throughput_tok_s=out_tokens / duration if duration > 0 else math.nan,
        e2e_p50_s=percentile(e2es, 50), e2e_p99_s=percentile(e2es, 99),
        output_tokens=out_tokens, duration_s=duration,
        goodput_rps=good / duration if duration > 0 else math.nan,
        goodput_fraction=good / len(traces) if traces else math.nan,
        slo_ttft_s=slo_ttft_s, slo_tpot_ms=slo_tpot_ms,
    )


def _meets(t: RequestTrace, slo_ttft_s: float | None, slo_tpot_ms: float | None) -> bool:
    if t.ttft is None:
        return False
    if slo_ttft_s is not None and t.ttft > slo_ttft_s:
        return False
    # A one-token answer has no TPOT and cannot miss a TPOT SLO.
    return slo_tpot_ms is None or t.tpot is None or t.tpot * 1000 <= slo_tpot_ms


def largest_concurrency_meeting_tps(levels: Iterable[LevelStats], min_tps: float) -> int | None:
    """The largest measured concurrency whose per-request TPS is at least `min_tps` (None if none)."""
    meeting = [lv.concurrency for lv in levels if lv.tps >= min_tps]  # nan compares False
    return max(meeting) if meeting else None


def _f(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def format_table(levels: Sequence[LevelStats], title: str | None = None,
                 labels: Sequence[str] | None = None, label_header: str = "Conc.") -> str:
    """Markdown table, one row per level (evalscope's columns plus success and goodput); rows are
    labelled by concurrency unless `labels` are given. The mean TPOT is evalscope's "Avg TPOT"; the
    throughput counts output tokens only (evalscope's "Output Throughput", not its "Total
    Throughput", which adds the prompt tokens)."""
    head = (f"| {label_header} | OK/Req | TTFT p50/p99 (s) | TPOT mean/p50/p99 (ms) | per-req TPS "
            "| Output tok/s | E2E p50/p99 (s) | Goodput (req/s, %) |")
    lines = ([f"### {title}", ""] if title else []) + [head, "|" + "---|" * 8]
    for i, lv in enumerate(levels):
        label = labels[i] if labels is not None else str(lv.concurrency)
        lines.append(
            f"| {label} | {lv.ok}/{lv.requests} | {_f(lv.ttft_p50_s, 3)} / {_f(lv.ttft_p99_s, 3)} "
            f"| {_f(lv.tpot_mean_ms, 1)} / {_f(lv.tpot_p50_ms, 1)} / {_f(lv.tpot_p99_ms, 1)} | {_f(lv.tps, 1)} "
            f"| {_f(lv.throughput_tok_s, 1)} | {_f(lv.e2e_p50_s, 2)} / {_f(lv.e2e_p99_s, 2)} "
            f"| {_f(lv.goodput_rps, 2)} ({_f(100 * lv.goodput_fraction, 0)}%) |")
    return "\n".join(lines)


# The comparison's columns: (header, LevelStats attribute, decimals).
COMPARED_METRICS: tuple[tuple[str, str, int], ...] = (
    ("TTFT p50 (s)", "ttft_p50_s", 3),
    ("TPOT mean (ms)", "tpot_mean_ms", 1),
    ("per-req TPS", "tps", 1),
    ("Output tok/s", "throughput_tok_s", 1),
    ("Goodput (req/s)", "goodput_rps", 2),
)


def ratio(a: float, b: float) -> float:
    """a / b, nan when either is missing or b is 0."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def format_comparison(results: Mapping[str, Sequence[LevelStats]]) -> str:
    """Side-by-side Markdown of several sweeps: one row per concurrency and endpoint, in the order
    given, with each metric's ratio to the first endpoint's at the same concurrency (x first)."""
    names = list(results)
    if not names:
        return ""
    base = {lv.concurrency: lv for lv in results[names[0]]}
    head = ("| Conc. | Endpoint | " + " | ".join(h for h, _, _ in COMPARED_METRICS) + " | "
            + " | ".join(f"{h.split(' (')[0]} x {names[0]}" for h, _, _ in COMPARED_METRICS) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(COMPARED_METRICS))]
    concurrencies = sorted({lv.concurrency for levels in results.values() for lv in levels})
    for conc in concurrencies:
        for name in names:
            lv = next((x for x in results[name] if x.concurrency == conc), None)
            if lv is None:
                continue
            ref = base.get(conc)
            values = [_f(getattr(lv, attr), digits) for _, attr, digits in COMPARED_METRICS]
            ratios = [_f(ratio(getattr(lv, attr), getattr(ref, attr)) if ref else math.nan, 2)
                      for _, attr, _ in COMPARED_METRICS]
            lines.append(f"| {conc} | {name} | " + " | ".join(values + ratios) + " |")
    return "\n".join(lines)


def levels_to_json(levels: Iterable[LevelStats]) -> list[dict]:
    return [lv.to_dict() for lv in levels]
