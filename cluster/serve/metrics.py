"""Prometheus metrics of the serving layer, in one registry the ingress serves at /metrics.

Per-request figures are recorded by the ingress as requests run; cluster-wide state (queue, in-flight,
per-worker load, KV counters) is pulled from the router's snapshot on each scrape.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import metric_names as mn

if TYPE_CHECKING:
    from ...actors.router import RouterSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2)
_E2E_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)
_HANDOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def _help(name: str) -> str:
    return mn.METRICS_BY_NAME[name].help


# Module-level: the HTTP middleware counts into it; each ServingMetrics registry exports it (and
# the gRPC counter below).
HTTP_RESPONSES = Counter(mn.HTTP_RESPONSES_TOTAL, _help(mn.HTTP_RESPONSES_TOTAL), ["route", "code"],
                         registry=None)
# The gRPC servicer counts into it as each call ends.
GRPC_RESPONSES = Counter(mn.GRPC_RESPONSES_TOTAL, _help(mn.GRPC_RESPONSES_TOTAL), ["method", "code"],
                         registry=None)
_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses",
                     "/v1/responses/input_tokens", "/v1/models", "/health", "/metrics"})


def route_label(path: str) -> str:
    """A request path as the `route` label: the API's routes, and "other" for any other path (so
    that a scan of random paths cannot grow the label set)."""
    if path in _ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class CountResponses:
    """ASGI middleware counting each HTTP response by route and status code as it starts."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        started = False

        async def counted(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                HTTP_RESPONSES.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:  # Starlette's outermost middleware answers it with a 500
            if not started:
                HTTP_RESPONSES.labels(route, "500").inc()
            raise


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(mn.TTFT_SECONDS, _help(mn.TTFT_SECONDS), buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(mn.TPOT_SECONDS, _help(mn.TPOT_SECONDS), buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(mn.E2E_LATENCY_SECONDS, _help(mn.E2E_LATENCY_SECONDS),
                             buckets=_E2E_BUCKETS, registry=r)
        self.admissions = Counter(mn.ADMISSIONS_TOTAL, _help(mn.ADMISSIONS_TOTAL), registry=r)
        self.rejections = Counter(mn.REJECTIONS_TOTAL, _help(mn.REJECTIONS_TOTAL), ["reason"],
                                  registry=r)
        self.requests = Counter(mn.REQUESTS_TOTAL, _help(mn.REQUESTS_TOTAL), ["status"], registry=r)
        r.register(HTTP_RESPONSES)
        r.register(GRPC_RESPONSES)
        self.prompt_tokens = Counter(mn.PROMPT_TOKENS_TOTAL, _help(mn.PROMPT_TOKENS_TOTAL), registry=r)
        self.generation_tokens = Counter(mn.GENERATION_TOKENS_TOTAL,
                                         _help(mn.GENERATION_TOKENS_TOTAL), registry=r)
        self.prefix_hit_tokens = Counter(mn.PREFIX_CACHE_HIT_TOKENS_TOTAL,
                                         _help(mn.PREFIX_CACHE_HIT_TOKENS_TOTAL), registry=r)
        # The gap between a request's first token (prefill) and its second (decode): the KV pull
        # (or recompute) plus one decode step, as the client sees it.
        self.first_to_second_token = Histogram(mn.FIRST_TO_SECOND_TOKEN_SECONDS,
                                               _help(mn.FIRST_TO_SECOND_TOKEN_SECONDS),
                                               buckets=_HANDOFF_BUCKETS, registry=r)
        self.cluster = _ClusterCollector()
        r.register(self.cluster)

    def set_cluster(self, snapshot: RouterSnapshot | None) -> None:
        """The router's latest snapshot, exported on the next scrape."""
        self.cluster.snapshot = snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    """Gauges and worker-side counters taken from a RouterSnapshot at scrape time."""

    def __init__(self) -> None:
        self.snapshot: RouterSnapshot | None = None

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        queue = GaugeMetricFamily(mn.QUEUE_DEPTH, _help(mn.QUEUE_DEPTH))
        inflight = GaugeMetricFamily(mn.INFLIGHT_REQUESTS, _help(mn.INFLIGHT_REQUESTS))
        running = GaugeMetricFamily(mn.WORKER_RUNNING_SEQS, _help(mn.WORKER_RUNNING_SEQS),
                                    labels=["worker", "role"])
        free = GaugeMetricFamily(mn.WORKER_FREE_BLOCKS, _help(mn.WORKER_FREE_BLOCKS),
                                 labels=["worker", "role"])
        handoff_bytes = CounterMetricFamily(mn.KV_HANDOFF_BYTES_TOTAL, _help(mn.KV_HANDOFF_BYTES_TOTAL))
        # Counted in blocks by the decode engines (per reason), not per prompt: the engine does not
        # report which request a failed block belonged to.
        recompute = CounterMetricFamily(mn.KV_RECOMPUTE_BLOCKS_TOTAL, _help(mn.KV_RECOMPUTE_BLOCKS_TOTAL),
                                        labels=["reason"])
        # speculative decoding, per worker: the engine's totals under the same names
        spec = {stat: CounterMetricFamily(name, _help(name), labels=["worker", "role"])
                for stat, name in (("spec_draft_tokens_total", mn.SPEC_DRAFT_TOKENS_TOTAL),
                                   ("spec_accepted_tokens_total", mn.SPEC_ACCEPTED_TOKENS_TOTAL),
                                   ("spec_verifications_total", mn.SPEC_VERIFICATIONS_TOTAL))}
        loading = GaugeMetricFamily(mn.KV_LOADING_REQUESTS, _help(mn.KV_LOADING_REQUESTS),
                                    labels=["worker", "role"])
        thread_seconds = CounterMetricFamily(mn.WORKER_STEP_THREAD_SECONDS_TOTAL,
                                             _help(mn.WORKER_STEP_THREAD_SECONDS_TOTAL),
                                             labels=["worker", "role"])
        # the engines keep fixed-bucket histograms; each report carries a cumulative snapshot
        histograms = {stat: HistogramMetricFamily(name, _help(name), labels=["worker", "role"])
                      for stat, name in (("step_seconds", mn.WORKER_STEP_SECONDS),
                                         ("kv_wait_seconds", mn.KV_WAIT_SECONDS))}
        if s is not None:
            queue.add_metric([], s.queued)
            inflight.add_metric([], s.in_flight)
            loaded = missing = corrupt = 0
            for w in s.workers:
                if w.report is None:
                    continue
                labels = [w.info.worker_id, w.info.role]
                running.add_metric(labels, w.report.running_seqs)
                free.add_metric(labels, w.report.free_blocks)
                for stat, family in spec.items():
                    family.add_metric(labels, w.report.stats.get(stat, 0))
                loading.add_metric(labels, w.report.stats.get("num_loading_kv", 0))
                thread_seconds.add_metric(labels, w.report.stats.get("step_thread_seconds_total", 0.0))
                for stat, family in histograms.items():
                    snapshot = w.report.stats.get(stat)
                    if snapshot:  # absent from a worker that predates it
                        family.add_metric(labels, _buckets(snapshot), snapshot["sum"])
                if w.info.role == "decode":
                    loaded += w.report.stats.get("kv_bytes_loaded", 0)
                    missing += w.report.stats.get("kv_missing_blocks", 0)
                    corrupt += w.report.stats.get("kv_corrupt_blocks", 0)
            handoff_bytes.add_metric([], loaded)
            recompute.add_metric(["missing"], missing)
            recompute.add_metric(["corrupt"], corrupt)
        yield from (queue, inflight, running, free, handoff_bytes, recompute, *spec.values(), loading,
                    thread_seconds, *histograms.values())


def _buckets(snapshot: dict) -> list[tuple[str, float]]:
    """A `LatencyHistogram.snapshot()` as HistogramMetricFamily buckets (the last bound is +Inf)."""
    return [(floatToGoString(le), count) for le, count in zip(snapshot["le"], snapshot["cumulative"])]
