"""A fixed-bucket latency histogram the engine keeps for its stats, in Prometheus' cumulative form."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# seconds: a CPU decode step is 10-300 ms, a KV wait up to seconds
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LatencyHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def snapshot(self) -> dict:
        """{"le": upper bounds (the last is +Inf), "cumulative": counts, "sum": seconds}."""
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"le": [*BUCKETS_S, float("inf")], "cumulative": cumulative, "sum": self.sum_s}
