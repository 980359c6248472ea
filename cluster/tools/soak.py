"""Overload soak: hold the cluster at a multiple of its concurrency target for a bounded time.

    python -m pdcluster.cluster.tools.soak --concurrency 64 --duration 180 [--base-url http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httpx
import psutil

from ..spec import is_loopback
from .bench_client import stream_completion
from .perf_metrics import RequestTrace, percentile

# Closed-loop clients stream completions until the deadline; the summary counts requests sent, served,
# rejected early (429), and errors (anything else), the p50/p99 TTFT of admitted requests (and how
# many met --ttft-slo), the RSS of the serving processes before and after, and, once the load is gone,
# the in-flight/queue gauges and the workers' free KV blocks against their number before the load.
# Bounded in time and requests, and it refuses non-loopback targets unless told they are yours.

WORDS = ("river", "stone", "garden", "lamp", "winter", "market", "violin", "harbour", "maple")


@dataclass
class SoakSummary:
    duration_s: float
    concurrency: int
    sent: int
    served: int
    rejected_early: int
    errors: int
    error_samples: list[str]
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_within_slo: float | None  # fraction of served requests whose TTFT met --ttft-slo
    rss_before_mib: float | None  # the `pdcluster up` process tree (None: not a local cluster)
    rss_after_mib: float | None
    in_flight_after: float | None
    queue_depth_after: float | None
    free_blocks_before: float | None  # summed over workers, idle before the load
    free_blocks_after: float | None  # the same once the load is gone: equal means nothing leaked

    @property
    def clean(self) -> bool:
        return (self.errors == 0 and not self.in_flight_after and not self.queue_depth_after
                and self.free_blocks_after == self.free_blocks_before)


def tree_rss_mib(root_pid: int | None) -> float | None:
    """RSS of a process and all its descendants: for a local `pdcluster up`, its Ray raylet and
    every actor (workers, router, ingress) and the mooncake_master they started, and nothing else
    running on the machine. None without a process to measure."""
    if root_pid is None:
        return None
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def gauge(metrics_text: str, name: str) -> float | None:
    """The sum of a gauge's samples (over all label sets), None if it is not exported."""
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values) if values else None


async def soak(base_url: str, model: str | None, concurrency: int, duration_s: float,
               max_requests: int, max_tokens: int, api_key: str | None,
               ttft_slo_s: float | None = None, server_pid: int | None = None) -> SoakSummary:
    url = base_url.rstrip("/") + "/completions"
    metrics_url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    traces: list[RequestTrace] = []
    rng = random.Random(0)
    deadline = time.monotonic() + duration_s
    budget = [max_requests]

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48)))
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
                    "stream_options": {"include_usage": True}}
            if model:
                body["model"] = model
            trace = await stream_completion(client, url, body, headers, 0)
            traces.append(trace)
            if trace.error and trace.error.startswith("HTTP 429"):
                await asyncio.sleep(0.2)      # a well-behaved client backs off (Retry-After)

    rss_before = tree_rss_mib(server_pid)
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        blocks_before = gauge((await client.get(metrics_url)).text, "pdcluster_worker_free_blocks")
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        # Let the workers free the last blocks and the router poll them (bounded).
        for _ in range(20):
            await asyncio.sleep(0.5)
            metrics = (await client.get(metrics_url)).text
            if gauge(metrics, "pdcluster_worker_free_blocks") == blocks_before and not gauge(
                    metrics, "pdcluster_inflight_requests"):
                break
    served = [t for t in traces if t.ok]
    rejected = [t for t in traces if not t.ok and (t.error or "").startswith("HTTP 429")]
    errors = [t for t in traces if not t.ok and t not in rejected]
    ttfts = [t.ttft for t in served if t.ttft is not None]
    return SoakSummary(
        duration_s=round(time.monotonic() - t0, 1), concurrency=concurrency, sent=len(traces),
        served=len(served), rejected_early=len(rejected), errors=len(errors),
        error_samples=sorted({(t.error or "")[:120] for t in errors})[:5],
        ttft_p50_s=round(percentile(ttfts, 50), 3), ttft_p99_s=round(percentile(ttfts, 99), 3),
        ttft_within_slo=(round(sum(t <= ttft_slo_s for t in ttfts) / len(ttfts), 4)
                         if ttft_slo_s and ttfts else None),
        rss_before_mib=_round(rss_before), rss_after_mib=_round(tree_rss_mib(server_pid)),
        in_flight_after=gauge(metrics, "pdcluster_inflight_requests"),
        queue_depth_after=gauge(metrics, "pdcluster_queue_depth"),
        free_blocks_before=blocks_before,
        free_blocks_after=gauge(metrics, "pdcluster_worker_free_blocks"))


def _round(mib: float | None) -> float | None:
    return None if mib is None else round(mib, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", type=int, default=64, help="clients (e.g. 2x the target)")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (bounded)")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ttft-slo", type=float, default=None,
                    help="report the fraction of served requests whose TTFT met this (seconds)")
    ap.add_argument("--allow-remote", action="store_true",
                    help="the target is not on this machine and you operate it")
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--server-pid", type=int, default=None,
                    help="measure this process tree's RSS (default: the local `pdcluster up`)")
    args = ap.parse_args(argv)
    if not is_loopback(urlsplit(args.base_url).hostname or "") and not args.allow_remote:
        ap.error("refusing a non-loopback target without --allow-remote")
    summary = asyncio.run(soak(args.base_url, args.model, args.concurrency, args.duration,
                               args.max_requests, args.max_tokens, args.api_key, args.ttft_slo,
                               args.server_pid or _local_up_pid()))
    for key, value in asdict(summary).items():
        print(f"{key:>16}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(summary), f, indent=2)
    return 0 if summary.clean else 1


def _local_up_pid() -> int | None:
    from ..launch.deployment import read_state

    state = read_state()
    return state.pid if state is not None and state.pid else None


if __name__ == "__main__":
    sys.exit(main())
