"""Router actor: admits requests (run, queue, or turn away early) and places each admitted one on a
prefill and a decode worker. It only decides and counts; tokens never pass through it.

The rules are the pure ones in `cluster/policy` (shared with `pdcluster simulate`); the workers and
their health belong to the controller, which sends its view here after every poll.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..cluster.policy.admission import AdmissionConfig, AdmissionController, Verdict
from ..cluster.policy.placement import WorkerLoad, decode_blocks_needed, pick_prefill, place, place_decode
from ..cluster.policy.prefix_affinity import PrefixIndex
from ..cluster.spec import ClusterSpec
from .worker import WorkerInfo, WorkerReport

log = logging.getLogger(__name__)

GONE_TTL_S = 120.0  # how long a released id is remembered (see Router._gone)
# An ingress replica renews its lease every second or so (`renew`); one silent for this long is taken
# for dead and every request it owned is released (its streams died with it).
LEASE_TTL_S = 10.0
# A placed request its live ingress replica stopped listing (its release never arrived: Ray may drop
# a call made as the request's task is cancelled) is released after this many renewals without it,
# and no sooner than ORPHAN_GRACE_S after placement (a renewal sent before admit() answered omits it).
ORPHAN_MISSES = 2
ORPHAN_GRACE_S = 3.0

# Reject reasons added to the admission policy's own: the request's client left while it was queued,
# it waited past its TTFT SLO, or no healthy worker can take it.
CANCELLED = "cancelled"
QUEUE_TIMEOUT = "queue_timeout"
NO_WORKER = "no_worker"
DRAINING = "draining"  # the cluster is shutting down: nothing new is admitted (HTTP 503)


def _admission_config(spec: ClusterSpec) -> AdmissionConfig:
    r = spec.router
    return AdmissionConfig(max_concurrency=r.max_concurrency, max_queue=r.max_queue,
                           ttft_slo_s=r.ttft_slo_s, tenant_limits=dict(r.per_key_limits))


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
    leases: dict[str, int] = field(default_factory=dict)  # ingress replica -> requests it holds
    expired_total: int = 0  # requests released because their ingress replica's lease ran out
    orphans_total: int = 0  # requests released because their live ingress replica no longer ran them


@dataclass(frozen=True)
class LeasedRequest:
    """A request an ingress replica is running, as it describes it to a router that does not know it
    (one restarted since it admitted the request)."""
    request_id: str
    prompt_len: int
    max_tokens: int
    prefix_hashes: list[str]
    tenant: str | None
    prefill: str | None
    decode: str | None
    prefilled: bool


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
    owner: str = ""  # the ingress replica running it ("": no lease, never expires)
    placed_at: float | None = None  # when it got its workers (None while queued)
    missed: int = 0  # consecutive renewals of its owner that did not list it


class Router:
    """Created by the controller with the ready workers; `controller` (an actor handle, or None in
    tests) hears of workers a request found dead."""

    def __init__(self, spec: dict, workers: list[WorkerInfo], controller: Any = None) -> None:
        self.spec = ClusterSpec.from_dict(spec)
        self._spec_version = 0  # the controller's count of redeploys applied (see reconfigure)
        self.controller = controller
        self.infos: dict[str, WorkerInfo] = {i.worker_id: i for i in workers}
        self.healthy: dict[str, bool] = dict.fromkeys(self.infos, True)
        self.reports: dict[str, WorkerReport] = {}
        self.assigned: dict[str, set[str]] = {w: set() for w in self.infos}  # not released yet
        self.placed_total: Counter[str] = Counter()
        self.prefixes = PrefixIndex()
        self.requests: dict[str, _Placed] = {}
        self.admission = AdmissionController(_admission_config(self.spec))
        self.admitted_total = 0
        self.rejected_total: Counter[str] = Counter()
        # Ids released before their admit() ran: Ray does not order an async actor's calls, so a
        # client that left at once may be released first; its late admit() must not take a slot.
        self._gone: OrderedDict[str, float] = OrderedDict()
        self.draining = False
        self.leases: dict[str, float] = {}  # ingress replica -> when it last renewed
        self.expired_total = 0  # requests released because their ingress replica stopped renewing
        self.orphans_total = 0  # requests released because their live ingress replica dropped them

    # ------------------------------------------------------------------ the controller's view
    def reconfigure(self, spec: dict, version: int) -> None:
        """Take a redeploy's spec, the controller's `version`th (it checked that only live settings
        changed): new admission limits apply to the requests running and queued here, which keep
        their slots, and queued ones a larger limit makes room for are placed now. An older version
        (a poll sent before the redeploy, arriving after it) is ignored."""
        if version <= self._spec_version:
            return
        self.spec, self._spec_version = ClusterSpec.from_dict(spec), version
        for admitted in self.admission.reconfigure(_admission_config(self.spec), time.monotonic()):
            waiting = self.requests[admitted]
            waiting.waiter.set_result(self._place(admitted, waiting, None))
        log.warning("reconfigured: %s", self.spec.router)

    def update_workers(self, infos: list[WorkerInfo], healthy: dict[str, bool],
                       reports: dict[str, WorkerReport], spec: dict | None = None,
                       spec_version: int = 0) -> None:
        """The controller's latest poll. A worker that came back as a new process (Ray restarted
        it) lost its prefix cache, so its affinity is forgotten. `spec` is the controller's: a
        router Ray restarted with the spec it was created with takes the one redeployed since."""
        if spec is not None:
            self.reconfigure(spec, spec_version)
        for info in infos:
            old = self.infos.get(info.worker_id)
            if old is not None and old.pid != info.pid:
                self.prefixes.forget(info.worker_id)
            self.infos[info.worker_id] = info
            self.assigned.setdefault(info.worker_id, set())
        self.healthy.update(healthy)
        self._learn_prefill_rate(reports)
        self.reports.update(reports)

    def _learn_prefill_rate(self, reports: dict[str, WorkerReport]) -> None:
        """The pool that prefills (decode when colocated) computes prompts at the sum of its healthy
        workers' rates; each worker's rate is its prompt tokens over the time of the steps that
        computed them, both since the previous poll (deltas of its engine's counters). A request's
        own tokens / latency would count queueing and batching as slowness."""
        role = "decode" if self.spec.colocated else "prefill"
        rates: list[float] = []
        for worker_id, report in reports.items():
            old = self.reports.get(worker_id)
            if old is None or self.infos[worker_id].role != role:
                continue
            tokens = report.stats.get("prefill_tokens_total", 0) - old.stats.get("prefill_tokens_total", 0)
            seconds = (report.stats.get("prefill_seconds_total", 0.0)
                       - old.stats.get("prefill_seconds_total", 0.0))
            if tokens > 0 and seconds > 0:  # a restarted worker's counters go back: no delta
                rates.append(tokens / seconds)
        if rates:
            pool = sum(1 for w, i in self.infos.items() if i.role == role and self.healthy.get(w))
            self.admission.observe_prefill_rate(sum(rates) / len(rates) * max(pool, 1))

    # ------------------------------------------------------------------ admission
    async def admit(self, request_id: str, prompt_len: int, max_tokens: int,
                    prefix_hashes: list[str], tenant: str | None = None, owner: str = "") -> Admission:
        """Admit now, after waiting in the queue, or reject. Every call must be paired with one
        `release(request_id)`, whatever the outcome, or `owner` (an ingress replica) must stop
        renewing its lease (it died: its requests are released)."""
        if self._gone.pop(request_id, None) is not None:
            return self._reject(request_id, CANCELLED, None, None)
        if self.draining:
            return self._reject(request_id, DRAINING, 1.0, None)
        now = time.monotonic()
        d = self.admission.admit(request_id, prompt_len, max_tokens, now, tenant)
        if d.verdict == Verdict.REJECT:
            return self._reject(request_id, d.reason, d.retry_after_s, d.predicted_ttft_s)
        if owner:
            self.leases[owner] = now
        req = _Placed(prompt_len, max_tokens, prefix_hashes, now, owner=owner)
        self.requests[request_id] = req
        if d.verdict == Verdict.ADMIT:
            return self._place(request_id, req, d.predicted_ttft_s)
        req.waiter = asyncio.get_running_loop().create_future()
        slo = self.spec.router.ttft_slo_s
        try:
            return await asyncio.wait_for(asyncio.shield(req.waiter), timeout=slo)
        except TimeoutError:
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

    # ------------------------------------------------------------------ ingress leases
    def renew(self, owner: str, request_ids: list[str]) -> list[str]:
        """Ingress replica `owner` is alive and runs `request_ids`; returns those this router does
        not know (it restarted since admitting them), for the owner to `restore`. Also releases the
        requests of replicas whose lease ran out."""
        now = time.monotonic()
        self.leases[owner] = now
        self._expire(now)
        self._release_orphans(owner, set(request_ids), now)
        return [r for r in request_ids if r not in self.requests and r not in self._gone]

    def _release_orphans(self, owner: str, listed: set[str], now: float) -> None:
        """Release `owner`'s placed requests that its renewals stopped listing: the replica lives
        but no longer runs them, so their release was lost."""
        orphans = []
        for request_id, req in self.requests.items():
            if req.owner != owner or req.placed_at is None:
                continue
            if request_id in listed:
                req.missed = 0
            elif now - req.placed_at >= ORPHAN_GRACE_S:
                req.missed += 1
                if req.missed >= ORPHAN_MISSES:
                    orphans.append(request_id)
        self.orphans_total += self._release_all(
            orphans, f"ingress {owner} no longer runs %d request(s) it never released: releasing them")

    def restore(self, owner: str, leased: list[LeasedRequest]) -> int:
        """Count requests that are running but unknown here (this router restarted): their slots,
        workers and owner, as their ingress replica describes them. Returns how many were added."""
        now = time.monotonic()
        self.leases[owner] = now
        added = 0
        for r in leased:
            if r.request_id in self.requests or r.request_id in self._gone:
                continue  # known, or released while the description was on its way
            self.requests[r.request_id] = _Placed(r.prompt_len, r.max_tokens, r.prefix_hashes, now,
                                                  r.prefill, r.decode, owner=owner, placed_at=now)
            self.admission.restore(r.request_id, r.prompt_len, r.tenant, now, r.prefilled)
            for worker in (None if r.prefilled else r.prefill, r.decode):
                if worker is not None:
                    self.assigned.setdefault(worker, set()).add(r.request_id)
            added += 1
        if added:
            log.warning("restored %d running request(s) of ingress %s", added, owner)
        return added

    def _expire(self, now: float) -> None:
        for owner, renewed in list(self.leases.items()):
            if now - renewed <= LEASE_TTL_S:
                continue
            del self.leases[owner]
            # Queued ones first, so the slots their running ones free go to other replicas' requests.
            owned = sorted((r for r, req in self.requests.items() if req.owner == owner),
                           key=lambda r: self.requests[r].waiter is None or self.requests[r].waiter.done())
            self.expired_total += self._release_all(
                owned, f"ingress {owner} stopped renewing its lease: releasing its %d request(s)")

    def _release_all(self, request_ids: list[str], why: str) -> int:
        """Release requests their ingress replica will never release (`why` logs their count)."""
        if request_ids:
            log.warning(why, len(request_ids))
        for request_id in request_ids:
            self.release(request_id)
        return len(request_ids)

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

    def prefill_done(self, request_id: str) -> None:
        """The ingress has this request's first token: its prompt is no longer prefill work ahead of
        newcomers (throughput itself is learnt from the workers' counters, `update_workers`)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.prefill is not None:
            self.assigned[req.prefill].discard(request_id)
        self.admission.observe_prefill(0, 0.0, [request_id])

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
        req.placed_at = time.monotonic()
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

    def pid(self) -> int:
        return os.getpid()

    def snapshot(self) -> RouterSnapshot:
        self._expire(time.monotonic())
        adm = self.admission
        return RouterSnapshot(
            in_flight=adm.in_flight, queued=adm.queued, admitted_total=self.admitted_total,
            rejected_total=dict(self.rejected_total), prefill_tok_s=adm.prefill_tok_s,
            workers=[WorkerState(self.infos[w], self.healthy[w], self.reports.get(w),
                                 len(self.assigned[w]), self.placed_total[w]) for w in self.infos],
            draining=self.draining, expired_total=self.expired_total,
            orphans_total=self.orphans_total,
            leases={o: sum(r.owner == o for r in self.requests.values()) for o in self.leases})
