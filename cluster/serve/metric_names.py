"""Prometheus metric names the serving layer exports; the Grafana dashboard may use only these.

Import the constants (or `METRICS` for kind and labels) rather than spelling names inline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()


TTFT_SECONDS = "pdcluster_ttft_seconds"
TPOT_SECONDS = "pdcluster_tpot_seconds"
E2E_LATENCY_SECONDS = "pdcluster_e2e_latency_seconds"
QUEUE_DEPTH = "pdcluster_queue_depth"
INFLIGHT_REQUESTS = "pdcluster_inflight_requests"
ADMISSIONS_TOTAL = "pdcluster_admissions_total"
REJECTIONS_TOTAL = "pdcluster_rejections_total"
REQUESTS_TOTAL = "pdcluster_requests_total"
HTTP_RESPONSES_TOTAL = "pdcluster_http_responses_total"
GRPC_RESPONSES_TOTAL = "pdcluster_grpc_responses_total"
PROMPT_TOKENS_TOTAL = "pdcluster_prompt_tokens_total"
GENERATION_TOKENS_TOTAL = "pdcluster_generation_tokens_total"
KV_HANDOFF_BYTES_TOTAL = "pdcluster_kv_handoff_bytes_total"
FIRST_TO_SECOND_TOKEN_SECONDS = "pdcluster_first_to_second_token_seconds"
PREFIX_CACHE_HIT_TOKENS_TOTAL = "pdcluster_prefix_cache_hit_tokens_total"
KV_RECOMPUTE_BLOCKS_TOTAL = "pdcluster_kv_recompute_blocks_total"
WORKER_RUNNING_SEQS = "pdcluster_worker_running_seqs"
WORKER_FREE_BLOCKS = "pdcluster_worker_free_blocks"
SPEC_DRAFT_TOKENS_TOTAL = "pdcluster_spec_draft_tokens_total"
SPEC_ACCEPTED_TOKENS_TOTAL = "pdcluster_spec_accepted_tokens_total"
SPEC_VERIFICATIONS_TOTAL = "pdcluster_spec_verifications_total"
WORKER_STEP_SECONDS = "pdcluster_worker_step_seconds"
WORKER_STEP_THREAD_SECONDS_TOTAL = "pdcluster_worker_step_thread_seconds_total"
KV_WAIT_SECONDS = "pdcluster_kv_wait_seconds"
KV_LOADING_REQUESTS = "pdcluster_kv_loading_requests"

METRICS: tuple[MetricDef, ...] = (
    MetricDef(TTFT_SECONDS, "histogram", "Time from request arrival to the first token"),
    MetricDef(TPOT_SECONDS, "histogram", "Mean time per output token after the first, per request"),
    MetricDef(E2E_LATENCY_SECONDS, "histogram", "Request latency from arrival to the last token"),
    MetricDef(QUEUE_DEPTH, "gauge", "Requests waiting for admission"),
    MetricDef(INFLIGHT_REQUESTS, "gauge", "Requests admitted and not finished"),
    MetricDef(ADMISSIONS_TOTAL, "counter", "Requests admitted by the router"),
    MetricDef(REJECTIONS_TOTAL, "counter", "Requests rejected by the router", ("reason",)),
    MetricDef(REQUESTS_TOTAL, "counter",
              "Finished requests to the engines, admitted or rejected by the router (a request's n "
              "choices count n)", ("status",)),
    MetricDef(HTTP_RESPONSES_TOTAL, "counter",
              "HTTP responses by route and status code, refusals of bad requests (4xx) included",
              ("route", "code")),
    MetricDef(GRPC_RESPONSES_TOTAL, "counter",
              "gRPC calls of the Inference service that reached the ingress, by method and final "
              "status code: refusals (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) and calls the "
              "client cancelled (CANCELLED) or let run past its deadline (DEADLINE_EXCEEDED) "
              "included",
              ("method", "code")),
    MetricDef(PROMPT_TOKENS_TOTAL, "counter", "Prompt tokens processed"),
    MetricDef(GENERATION_TOKENS_TOTAL, "counter", "Output tokens generated"),
    MetricDef(KV_HANDOFF_BYTES_TOTAL, "counter", "KV cache bytes moved from prefill to decode"),
    MetricDef(FIRST_TO_SECOND_TOKEN_SECONDS, "histogram",
              "Time from a request's first token (prefill) to its second (decode): the KV handoff "
              "(or recompute) plus one decode step"),
    MetricDef(PREFIX_CACHE_HIT_TOKENS_TOTAL, "counter", "Prompt tokens served from cached KV blocks"),
    MetricDef(KV_RECOMPUTE_BLOCKS_TOTAL, "counter",
              "Handed-off KV blocks a decode worker could not load (missing/corrupt) and recomputed",
              ("reason",)),
    MetricDef(WORKER_RUNNING_SEQS, "gauge", "Sequences running on a worker", ("worker", "role")),
    MetricDef(WORKER_FREE_BLOCKS, "gauge", "Free KV blocks on a worker", ("worker", "role")),
    MetricDef(SPEC_DRAFT_TOKENS_TOTAL, "counter", "Draft tokens verified on a worker (speculative decoding)",
              ("worker", "role")),
    MetricDef(SPEC_ACCEPTED_TOKENS_TOTAL, "counter", "Draft tokens accepted on a worker",
              ("worker", "role")),
    MetricDef(SPEC_VERIFICATIONS_TOTAL, "counter",
              "Draft verifications on a worker (one per sequence and step with drafts)", ("worker", "role")),
    MetricDef(WORKER_STEP_SECONDS, "histogram", "Model step time on a worker", ("worker", "role")),
    MetricDef(WORKER_STEP_THREAD_SECONDS_TOTAL, "counter",
              "Model step time on a worker times the threads each step ran on (over the step "
              "time's sum: the mean threads per step)", ("worker", "role")),
    MetricDef(KV_WAIT_SECONDS, "histogram",
              "Time a request waited in LOADING on a worker, from admission until its KV blocks "
              "arrived from the store", ("worker", "role")),
    MetricDef(KV_LOADING_REQUESTS, "gauge",
              "Requests admitted on a worker whose KV blocks are still arriving (LOADING)",
              ("worker", "role")),
)

METRIC_NAMES: frozenset[str] = frozenset(m.name for m in METRICS)
METRICS_BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}
