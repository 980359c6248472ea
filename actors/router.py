"""Router actor: admits requests (run, queue, or turn away early) and places each admitted one on a
prefill and a decode worker. It only decides and counts; tokens never pass through it.

The rules are the pure ones in `cluster/policy` (shared with `pdcluster simulate`); the workers and
their health belong to the controller, which sends its view here after every poll.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from ..cluster.policy.admission import AdmissionConfig, AdmissionController, Verdict
from ..cluster.policy.placement import WorkerLoad, decode_blocks_needed, pick_prefill, place, place_decode
from ..cluster.policy.prefix_affinity import PrefixIndex
from ..cluster.spec import ClusterSpec
from .worker import WorkerInfo, WorkerReport

log = logging.getLogger(__name__)

GONE_TTL_S = 120.0  # how long a released id is remembered (see Router._gone)

# Reject reasons added to the admission policy's own: the request's client left while it was queued,
# it waited past its TTFT SLO, or no healthy worker can take it.
CANCELLED = "cancelled"
QUEUE_TIMEOUT = "queue_timeout"
NO_WORKER = "no_worker"
DRAINING = "draining"  # the cluster is shutting down: nothing new is admitted (HTTP 503)


@dataclass(frozen=True)
class Admission:
    request_id: str
    admitted: bool
    prefill_worker: str | None = None
    decode_worker: str | None = None
    reason: str | None = None  # why it was rejected
    retry_after_s: float | None = None
    predicted_ttft_s: float | None = None
    queued_s: float = 0.0  # time spent waiting for a slot


@dataclass(frozen=True)
class WorkerState:
    info: WorkerInfo
    healthy: bool
    report: WorkerReport | None  # last successful poll
    assigned: int  # requests placed here and not released
    placed_total: int


@dataclass(frozen=True)
class RouterSnapshot:
    in_flight: int
    queued: int
    admitted_total: int
    rejected_total: dict[str, int]
    prefill_tok_s: float
    workers: list[WorkerState]
    draining: bool = False


@dataclass
class _Placed:
    """What admission and placement need of one request, from admit() to release()."""
    prompt_len: int
    max_tokens: int
    prefix_hashes: list[str]
    arrived: float
    prefill: str | None = None
    decode: str | None = None
    waiter: asyncio.Future | None = None  # set while queued


class Router:
    """Created by the controller with the ready workers; `controller` (an actor handle, or None in
    tests) hears of workers a request found dead."""

    def __init__(self, spec: dict, workers: list[WorkerInfo], controller: Any = None) -> None:
        self.spec = ClusterSpec.from_dict(spec)
        self.controller = controller
        self.infos: dict[str, WorkerInfo] = {i.worker_id: i for i in workers}
        self.healthy: dict[str, bool] = dict.fromkeys(self.infos, True)
        self.reports: dict[str, WorkerReport] = {}
        self.assigned: dict[str, set[str]] = {w: set() for w in self.infos}  # not released yet
        self.placed_total: Counter[str] = Counter()
        self.prefixes = PrefixIndex()
        self.requests: dict[str, _Placed] = {}
        r = self.spec.router
        self.admission = AdmissionController(AdmissionConfig(
            max_concurrency=r.max_concurrency, max_queue=r.max_queue, ttft_slo_s=r.ttft_slo_s,
            tenant_limits=dict(r.per_key_limits)))
        self.admitted_total = 0
        self.rejected_total: Counter[str] = Counter()
        # Ids released before their admit() ran: Ray does not order an async actor's calls, so a
        # client that left at once may be released first; its late admit() must not take a slot.
        self._gone: OrderedDict[str, float] = OrderedDict()
        self.draining = False

    # ------------------------------------------------------------------ the controller's view
    def update_workers(self, infos: list[WorkerInfo], healthy: dict[str, bool],
                       reports: dict[str, WorkerReport]) -> None:
        """The controller's latest poll. A worker that came back as a new process (Ray restarted
        it) lost its prefix cache, so its affinity is forgotten."""
        for info in infos:
            old = self.infos.get(info.worker_id)
            if old is not None and old.pid != info.pid:
                self.prefixes.forget(info.worker_id)
            self.infos[info.worker_id] = info
            self.assigned.setdefault(info.worker_id, set())
        self.healthy.update(healthy)
        self.reports.update(reports)

    # ------------------------------------------------------------------ admission
    async def admit(self, request_id: str, prompt_len: int, max_tokens: int,
                    prefix_hashes: list[str], tenant: str | None = None) -> Admission:
        """Admit now, after waiting in the queue, or reject. Every call must be paired with one
        `release(request_id)`, whatever the outcome."""
        if self._gone.pop(request_id, None) is not None:
            return self._reject(request_id, CANCELLED, None, None)
        if self.draining:
            return self._reject(request_id, DRAINING, 1.0, None)
        now = time.monotonic()
        d = self.admission.admit(request_id, prompt_len, max_tokens, now, tenant)
        if d.verdict == Verdict.REJECT:
            return self._reject(request_id, d.reason, d.retry_after_s, d.predicted_ttft_s)
        req = _Placed(prompt_len, max_tokens, prefix_hashes, now)
        self.requests[request_id] = req
        if d.verdict == Verdict.ADMIT:
            return self._place(request_id, req, d.predicted_ttft_s)
        req.waiter = asyncio.get_running_loop().create_future()
        slo = self.spec.router.ttft_slo_s
        try:
            return await asyncio.wait_for(asyncio.shield(req.waiter), timeout=slo)
        except asyncio.TimeoutError:
            if req.waiter.done():  # admitted at the deadline
                return req.waiter.result()
            self.admission.cancel(request_id)
            self.requests.pop(request_id, None)
            return self._reject(request_id, QUEUE_TIMEOUT, slo, d.predicted_ttft_s)

    def release(self, request_id: str) -> None:
        """The request finished, failed, was rejected or its client left. Idempotent."""
        req = self.requests.pop(request_id, None)
        if req is None:
            self._remember_gone(request_id)
            return
        if req.waiter is not None and not req.waiter.done():  # still queued: its client left
            self.admission.cancel(request_id)
            req.waiter.set_result(self._reject(request_id, CANCELLED, None, None))
            return
        for worker in (req.prefill, req.decode):
            if worker is not None:
                self.assigned[worker].discard(request_id)
        self._free_slot(request_id)

    def drain(self) -> int:
        """Stop admitting: new requests and those still queued are rejected (503, retry elsewhere);
        admitted ones run to completion. Returns how many are still in flight. Idempotent."""
        if not self.draining:
            log.warning("draining: no new requests are admitted")
        self.draining = True
        for request_id, req in list(self.requests.items()):
            if req.waiter is not None and not req.waiter.done():
                self.admission.cancel(request_id)
                del self.requests[request_id]
                req.waiter.set_result(self._reject(request_id, DRAINING, 1.0, None))
        return self.admission.in_flight

    def _remember_gone(self, request_id: str) -> None:
        now = time.monotonic()
        self._gone[request_id] = now
        while self._gone and next(iter(self._gone.values())) < now - GONE_TTL_S:
            self._gone.popitem(last=False)

    def _free_slot(self, request_id: str) -> None:
        """Give `request_id`'s admission slot to the next queued requests and place them."""
        for admitted in self.admission.release(request_id, time.monotonic()):
            waiting = self.requests[admitted]
            waiting.waiter.set_result(self._place(admitted, waiting, None))

    def prefill_done(self, request_id: str, tokens: int, seconds: float) -> None:
        """Feedback from the ingress: this request's prefill took `seconds` for `tokens` new tokens."""
        req = self.requests.get(request_id)
        if req is not None and req.prefill is not None:
            self.assigned[req.prefill].discard(request_id)
            self.admission.observe_prefill(tokens, seconds, [request_id])

    # ------------------------------------------------------------------ placement
    def reroute(self, request_id: str, failed: str) -> str | None:
        """`failed` (a worker of this request) died: stop placing there and move the request to the
        best healthy worker of the same role; None if there is none (or the request is gone)."""
        if self.healthy.get(failed):
            log.error("worker %s marked unhealthy: a call to it failed", failed)
            if self.controller is not None:
                self.controller.worker_failed.remote(failed, "a call to it failed")
        self.healthy[failed] = False
        req = self.requests.get(request_id)
        if req is None:
            return None
        loads = self._loads()
        if self.infos[failed].role == "prefill":
            worker = pick_prefill(loads, req.prefix_hashes, self._block_size())
        else:
            worker = place_decode(loads, self._needed_blocks(req))
        if worker is None:
            return None
        self.assigned[failed].discard(request_id)
        self.assigned[worker].add(request_id)
        self.placed_total[worker] += 1
        if self.infos[failed].role == "prefill":
            req.prefill = worker
        else:
            req.decode = worker
        return worker

    def _reject(self, request_id: str, reason: str, retry_after_s: float | None,
                predicted: float | None) -> Admission:
        self.rejected_total[reason] += 1
        return Admission(request_id, False, reason=reason, retry_after_s=retry_after_s,
                         predicted_ttft_s=predicted)

    def _place(self, request_id: str, req: _Placed, predicted: float | None) -> Admission:
        placed = place(self._loads(), req.prefix_hashes, self._needed_blocks(req), self._block_size(),
                       self.spec.colocated)
        if placed is None:
            self.requests.pop(request_id, None)
            self._free_slot(request_id)
            return self._reject(request_id, NO_WORKER, 1.0, predicted)
        req.prefill, req.decode = placed.prefill, placed.decode
        for worker in filter(None, (placed.prefill, placed.decode)):
            self.assigned[worker].add(request_id)
            self.placed_total[worker] += 1
        if placed.prefill is not None:
            self.prefixes.record(placed.prefill, req.prefix_hashes)
        self.admitted_total += 1
        return Admission(request_id, True, placed.prefill, placed.decode, predicted_ttft_s=predicted,
                         queued_s=time.monotonic() - req.arrived)

    def _block_size(self) -> int:
        return next(iter(self.infos.values())).block_size

    def _needed_blocks(self, req: _Placed) -> int:
        return decode_blocks_needed(req.prompt_len, req.max_tokens, self._block_size())

    def _loads(self) -> list[WorkerLoad]:
        return [self._load(w) for w in self.infos]

    def _load(self, worker_id: str) -> WorkerLoad:
        info, report = self.infos[worker_id], self.reports.get(worker_id)
        mine = self.assigned[worker_id]
        # Counts of what this router placed are exact and current; the polled report only adds
        # the free-block figure (up to one poll interval old).
        return WorkerLoad(
            worker_id=worker_id, role=info.role, healthy=self.healthy[worker_id],
            outstanding_prefill_tokens=sum(self.requests[r].prompt_len for r in mine
                                           if r in self.requests),
            running_seqs=len(mine),
            free_blocks=report.free_blocks if report else info.num_total_blocks,
            total_blocks=info.num_total_blocks,
            cached_prefixes=self.prefixes.view(worker_id) if info.role == "prefill" else frozenset(),
            max_running_seqs=info.max_num_seqs)

    # ------------------------------------------------------------------ introspection
    def node_id(self) -> str:
        """The Ray node this router runs on (the head's, by its placement)."""
        import ray  # only as an actor: the class itself runs without Ray (tests, the simulator's check)

        return ray.get_runtime_context().get_node_id()

    def snapshot(self) -> RouterSnapshot:
        adm = self.admission
        return RouterSnapshot(
            in_flight=adm.in_flight, queued=adm.queued, admitted_total=self.admitted_total,
            rejected_total=dict(self.rejected_total), prefill_tok_s=adm.prefill_tok_s,
            workers=[WorkerState(self.infos[w], self.healthy[w], self.reports.get(w),
                                 len(self.assigned[w]), self.placed_total[w]) for w in self.infos],
            draining=self.draining)
