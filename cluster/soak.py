"""Overload soak: hold the cluster at a multiple of its concurrency target for a bounded time.

    python -m pdcluster.cluster.soak --concurrency 64 --duration 180 [--base-url http://127.0.0.1:8000/v1]

Closed-loop clients stream completions until the deadline; the summary counts requests sent, served,
rejected early (429), and errors (anything else), the p50/p99 TTFT of admitted requests, the RSS of
the serving processes before and after, and the in-flight/queue gauges once the load is gone.
Bounded in time and requests, and it refuses non-loopback targets unless told they are yours.
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

from pdcluster.cluster.bench import stream_completion
from pdcluster.cluster.perf import RequestTrace, percentile
from pdcluster.cluster.spec import is_loopback

SERVING_PROCESSES = ("ray::PrefillWorker", "ray::DecodeWorker", "ray::Router", "ray::ServeReplica",
                     "ray::ServeController", "ray::ProxyActor", "mooncake_master")
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
    rss_before_mib: float
    rss_after_mib: float
    in_flight_after: float | None
    queue_depth_after: float | None


def serving_rss_mib() -> float:
    total = 0
    for proc in psutil.process_iter(["cmdline", "name", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        if any(tag in cmd for tag in SERVING_PROCESSES) and proc.info["memory_info"]:
            total += proc.info["memory_info"].rss
    return total / 2**20


def gauge(metrics_text: str, name: str) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def soak(base_url: str, model: str | None, concurrency: int, duration_s: float,
               max_requests: int, max_tokens: int, api_key: str | None) -> SoakSummary:
    url = base_url.rstrip("/") + "/completions"
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

    rss_before = serving_rss_mib()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        await asyncio.sleep(1.0)             # let the router see the last releases
        metrics = (await client.get(base_url.rstrip("/").removesuffix("/v1") + "/metrics")).text
    served = [t for t in traces if t.ok]
    rejected = [t for t in traces if not t.ok and (t.error or "").startswith("HTTP 429")]
    errors = [t for t in traces if not t.ok and t not in rejected]
    ttfts = [t.ttft for t in served if t.ttft is not None]
    return SoakSummary(
        duration_s=round(time.monotonic() - t0, 1), concurrency=concurrency, sent=len(traces),
        served=len(served), rejected_early=len(rejected), errors=len(errors),
        error_samples=sorted({(t.error or "")[:120] for t in errors})[:5],
        ttft_p50_s=round(percentile(ttfts, 50), 3), ttft_p99_s=round(percentile(ttfts, 99), 3),
        rss_before_mib=round(rss_before, 1), rss_after_mib=round(serving_rss_mib(), 1),
        in_flight_after=gauge(metrics, "pdcluster_inflight_requests"),
        queue_depth_after=gauge(metrics, "pdcluster_queue_depth"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", type=int, default=64, help="clients (e.g. 2x the target)")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (bounded)")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--allow-remote", action="store_true",
                    help="the target is not on this machine and you operate it")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    if not is_loopback(urlsplit(args.base_url).hostname or "") and not args.allow_remote:
        ap.error("refusing a non-loopback target without --allow-remote")
    summary = asyncio.run(soak(args.base_url, args.model, args.concurrency, args.duration,
                               args.max_requests, args.max_tokens, args.api_key))
    for key, value in asdict(summary).items():
        print(f"{key:>16}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(summary), f, indent=2)
    clean = summary.errors == 0 and not summary.in_flight_after and not summary.queue_depth_after
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
