"""Admission control: how many requests run at once, how many wait, and which are turned away early.

Pure: no I/O, no clocks (callers pass `now`), no Ray; the router actor and the simulator share it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum


class Verdict(str, Enum):
    ADMIT = "admit"  # run now
    QUEUE = "queue"  # wait for a slot; release() hands it one
    REJECT = "reject"  # turn away (HTTP 429 / gRPC RESOURCE_EXHAUSTED), see Decision.reason


# Reject reasons.
QUEUE_FULL = "queue_full"
TTFT_SLO = "ttft_slo"
TENANT_LIMIT = "tenant_limit"


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrency: int = 32  # requests in flight (prefilling or decoding) cluster-wide
    max_queue: int = 64  # requests waiting for a slot
    ttft_slo_s: float | None = None  # reject when the predicted TTFT exceeds it
    # Per-tenant cap on requests in flight plus queued; the tenant is the API key (or a hash of it).
    tenant_limits: Mapping[str, int] = field(default_factory=dict)
    default_tenant_limit: int | None = None  # cap for tenants not in tenant_limits
    prefill_tok_s_prior: float = 4000.0  # prefill throughput assumed until observe_prefill() is called
    ewma_alpha: float = 0.2  # weight of a new observation in the prefill-rate and service-time averages
    min_retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        if self.prefill_tok_s_prior <= 0 or not 0 < self.ewma_alpha <= 1:
            raise ValueError("prefill_tok_s_prior must be > 0 and ewma_alpha in (0, 1]")


@dataclass(frozen=True)
class Decision:
    request_id: str
    verdict: Verdict
    reason: str | None = None  # set on REJECT
    retry_after_s: float | None = None  # set on REJECT when retrying can help
    predicted_ttft_s: float | None = None


@dataclass
class _Request:
    request_id: str
    prompt_len: int
    tenant: str | None
    since: float  # admitted at (in flight) or queued at
    prefilled: bool = False


class AdmissionController:
    """Admits up to `max_concurrency` requests, queues up to `max_queue` more, rejects the rest.

    Queued requests are served round-robin across tenants and FIFO within a tenant, so one tenant's
    burst cannot starve others; with a single tenant this is plain FIFO.

    TTFT prediction for a new request = time until it gets a slot + (prompt tokens not yet prefilled
    ahead of it + its own prompt) / observed prefill throughput. The slot wait is zero when it is
    admitted at once, else position / release rate, where slots free at max_concurrency / mean service
    time in steady state (service times observed on release); before any release it is taken as zero,
    i.e. the predictor starts optimistic.
    """

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self._running: dict[str, _Request] = {}
        self._queues: OrderedDict[str | None, deque[_Request]] = OrderedDict()  # tenant -> FIFO
        self._queued: dict[str, _Request] = {}
        self._per_tenant: dict[str | None, int] = {}  # in flight + queued
        self._unprefilled_running_tokens = 0
        self._queued_tokens = 0
        self._prefill_tok_s = self.config.prefill_tok_s_prior
        self._service_s: float | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def prefill_tok_s(self) -> float:
        return self._prefill_tok_s

    def admit(self, request_id: str, prompt_len: int, max_tokens: int, now: float,
              tenant: str | None = None) -> Decision:
        cfg = self.config
        if request_id in self._running or request_id in self._queued:
            raise ValueError(f"request {request_id!r} is already admitted or queued")
        limit = cfg.tenant_limits.get(tenant, cfg.default_tenant_limit) if tenant is not None else None
        if limit is not None and self._per_tenant.get(tenant, 0) >= limit:
            return Decision(request_id, Verdict.REJECT, TENANT_LIMIT, self._retry_after(1))

        run_now = self.in_flight < cfg.max_concurrency and not self._queued
        if not run_now and self.queued >= cfg.max_queue:
            return Decision(request_id, Verdict.REJECT, QUEUE_FULL, self._retry_after(self.queued + 1))
        position = 0 if run_now else self.queued + 1
        ttft = self.predict_ttft(prompt_len, position)
        if cfg.ttft_slo_s is not None and ttft > cfg.ttft_slo_s:
            return Decision(request_id, Verdict.REJECT, TTFT_SLO,
                            max(cfg.min_retry_after_s, ttft - cfg.ttft_slo_s), ttft)

        req = _Request(request_id, prompt_len, tenant, now)
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        if run_now:
            self._start(req, now)
            return Decision(request_id, Verdict.ADMIT, predicted_ttft_s=ttft)
        self._queues.setdefault(tenant, deque()).append(req)
        self._queued[request_id] = req
        self._queued_tokens += prompt_len
        return Decision(request_id, Verdict.QUEUE, predicted_ttft_s=ttft)

    def restore(self, request_id: str, prompt_len: int, tenant: str | None, now: float,
                prefilled: bool) -> None:
        """Count a request that is already running (a restarted router hears of it from the ingress
        that owns it): no limit applies, it holds a slot until released. Idempotent."""
        if request_id in self._running:
            return
        self.cancel(request_id)
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        self._start(_Request(request_id, prompt_len, tenant, now), now)
        if prefilled:
            self.observe_prefill(0, 0.0, [request_id])

    def predict_ttft(self, prompt_len: int, position: int = 0) -> float:
        """Predicted TTFT of a `prompt_len` request at queue `position` (0: it would run now)."""
        ahead = self._unprefilled_running_tokens + (self._queued_tokens if position else 0)
        return self._slot_wait(position) + (ahead + prompt_len) / self._prefill_tok_s

    def observe_prefill(self, tokens: int, seconds: float, request_ids: Iterable[str] = ()) -> None:
        """Feed back one measured prefill step (any worker): `tokens` prompt tokens in `seconds`, for
        `request_ids`, whose prompts then no longer count as prefill work ahead of newcomers."""
        if tokens > 0 and seconds > 0:
            a = self.config.ewma_alpha
            self._prefill_tok_s = (1 - a) * self._prefill_tok_s + a * tokens / seconds
        for request_id in request_ids:
            req = self._running.get(request_id)
            if req is not None and not req.prefilled:
                req.prefilled = True
                self._unprefilled_running_tokens -= req.prompt_len

    def observe_prefill_rate(self, tok_s: float) -> None:
        """Feed back the prefill pool's measured throughput (tokens/s over all its workers)."""
        if tok_s > 0:
            a = self.config.ewma_alpha
            self._prefill_tok_s = (1 - a) * self._prefill_tok_s + a * tok_s

    def release(self, request_id: str, now: float) -> list[str]:
        """The request finished, failed or its client left: free its slot and return the ids admitted
        from the queue into the freed slots. Idempotent; a still-queued id is cancelled instead."""
        req = self._running.pop(request_id, None)
        if req is None:
            self.cancel(request_id)
            return []
        if not req.prefilled:
            self._unprefilled_running_tokens -= req.prompt_len
        self._drop_tenant(req.tenant)
        served = now - req.since
        a = self.config.ewma_alpha
        self._service_s = served if self._service_s is None else (1 - a) * self._service_s + a * served
        return self._fill_slots(now)

    def _fill_slots(self, now: float) -> list[str]:
        admitted: list[str] = []
        while self._queued and self.in_flight < self.config.max_concurrency:
            nxt = self._pop_fair()
            self._start(nxt, now)
            admitted.append(nxt.request_id)
        return admitted

    def reconfigure(self, config: AdmissionConfig, now: float) -> list[str]:
        """Apply new limits to the running state (a redeploy): what runs and waits stays, as does
        what was learnt; returns the queued ids a larger `max_concurrency` admits now. A smaller one
        or a shorter queue turns nobody away: they apply to what arrives next."""
        self.config = config
        return self._fill_slots(now)

    def cancel(self, request_id: str) -> bool:
        """Remove a queued request whose client left; False if it is not queued (release it instead)."""
        req = self._queued.pop(request_id, None)
        if req is None:
            return False
        q = self._queues[req.tenant]
        q.remove(req)
        if not q:
            del self._queues[req.tenant]
        self._queued_tokens -= req.prompt_len
        self._drop_tenant(req.tenant)
        return True

    def _start(self, req: _Request, now: float) -> None:
        req.since = now
        self._running[req.request_id] = req
        self._unprefilled_running_tokens += req.prompt_len

    def _pop_fair(self) -> _Request:
        # Round-robin: take the head of the first tenant's FIFO, then move that tenant to the back.
        tenant, q = next(iter(self._queues.items()))
        req = q.popleft()
        if q:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]
        del self._queued[req.request_id]
        self._queued_tokens -= req.prompt_len
        return req

    def _drop_tenant(self, tenant: str | None) -> None:
        n = self._per_tenant[tenant] - 1
        if n:
            self._per_tenant[tenant] = n
        else:
            del self._per_tenant[tenant]

    def _slot_wait(self, position: int) -> float:
        """Expected time until `position` slots free up (0 before any service time is observed)."""
        if self._service_s is None:
            return 0.0
        return position * self._service_s / self.config.max_concurrency

    def _retry_after(self, position: int) -> float:
        """Suggested client back-off: how long until `position` more slots are likely to free up."""
        return max(self.config.min_retry_after_s, self._slot_wait(position))
