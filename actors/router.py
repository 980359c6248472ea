"""Router actor: owns the worker pools and the Mooncake master supervisor, admits requests and picks
their (prefill, decode) pair. It only decides and counts; tokens never pass through it.

Policies are the pure ones in `pdcluster.cluster.policy.admission` / `routing`; this wrapper adds the state
they need (what is placed where, polled worker load, queued requests waiting for a slot).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from .decode_worker import DecodeWorker
from .worker import WorkerInfo, WorkerReport
from .master_supervisor import MasterStatus, MasterSupervisor, master_placement
from .node_client_supervisor import stop_node_clients
from .prefill_worker import PrefillWorker
from ..cluster.policy.admission import AdmissionConfig, AdmissionController, Verdict
from ..cluster.policy.prefix_affinity import PrefixIndex
from ..cluster.policy.placement import WorkerLoad, pick_decode, pick_prefill
from ..cluster.spec import ClusterSpec

log = logging.getLogger(__name__)

NAMESPACE = "pdcluster"
ROUTER_NAME = "pdcluster-router"
MASTER_NAME = "pdcluster-mooncake-master"
HEAD_NODE = {"node:__internal_head__": 0.001}
POLL_INTERVAL_S = 0.5
POLL_TIMEOUT_S = 5.0
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


@dataclass(frozen=True)
class ClusterInfo:
    """What the ingress needs to know about the running cluster."""
    model_name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    workers: dict[str, WorkerInfo]
    handles: dict[str, Any] = field(repr=False)  # worker id -> ActorHandle
    router_node_id: str = ""
    master: MasterStatus | None = None


@dataclass
class _Placed:
    prompt_len: int
    max_tokens: int
    prefix_hashes: list[str]
    tenant: str | None
    arrived: float
    prefill: str | None = None
    decode: str | None = None
    waiter: asyncio.Future | None = None  # set while queued


class Router:
    """Create with `router_options(spec)`; call `ready()` before anything else."""

    async def __init__(self, spec: dict) -> None:
        self.spec = ClusterSpec.from_dict(spec)
        self._spec_dict = self.spec.to_dict()
        self.admission: AdmissionController | None = None
        self.prefixes = PrefixIndex()
        self.master = None
        self.handles: dict[str, Any] = {}
        self.infos: dict[str, WorkerInfo] = {}
        self.reports: dict[str, WorkerReport] = {}
        self.healthy: dict[str, bool] = {}
        self.assigned: dict[str, set[str]] = {}  # worker -> request ids placed there, not released
        self.placed_total: Counter[str] = Counter()
        self.requests: dict[str, _Placed] = {}
        self.admitted_total = 0
        self.rejected_total: Counter[str] = Counter()
        self._master_status: MasterStatus | None = None
        # Ids released before their admit() ran: Ray does not order an async actor's calls, so a
        # client that left at once may be released first; its late admit() must not take a slot.
        self._gone: OrderedDict[str, float] = OrderedDict()
        self.draining = False
        self._started = asyncio.create_task(self._start())
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------------ startup
    async def _start(self) -> None:
        gcs = ray.get_runtime_context().gcs_address
        self.master = ray.remote(MasterSupervisor).options(
            name=MASTER_NAME, namespace=NAMESPACE, num_cpus=0,
            resources=master_placement(self.spec.store)).remote(self._spec_dict["store"], gcs)
        self._master_status = await self.master.start.remote()
        self._check_pools()
        actors = {"prefill": ray.remote(PrefillWorker), "decode": ray.remote(DecodeWorker)}
        for role in ("prefill", "decode"):
            for i in range(self.spec.pool(role).replicas):
                worker_id = f"{role}-{i}"
                self.handles[worker_id] = actors[role].options(
                    name=worker_id, namespace=NAMESPACE, max_concurrency=1000,
                    **self.spec.worker_actor_options(role)).remote(self._spec_dict, worker_id)
        infos = await asyncio.gather(*(h.ready.remote() for h in self.handles.values()))
        self.infos = {i.worker_id: i for i in infos}
        for w in self.infos:
            self.healthy[w] = True
            self.assigned[w] = set()
        self.admission = AdmissionController(AdmissionConfig(
            max_concurrency=self.spec.router.max_concurrency, max_queue=self.spec.router.max_queue,
            ttft_slo_s=self.spec.router.ttft_slo_s, max_model_len=self._max_model_len(),
            tenant_limits=dict(self.spec.router.per_key_limits)))
        await self._poll()
        self._poller = asyncio.create_task(self._poll_forever())
        log.info("router ready: %s", ", ".join(f"{i.worker_id}@{i.node_ip}" for i in infos))

    def _check_pools(self) -> None:
        have = ray.cluster_resources()
        for role in ("prefill", "decode"):
            pool = self.spec.pool(role)
            if have.get(pool.role_resource, 0) < pool.replicas:
                log.error("%s pool wants %d node(s) with resource %r but the cluster has %g; workers "
                          "wait until such nodes join (ray start --resources='{\"%s\": 1}')",
                          role, pool.replicas, pool.role_resource, have.get(pool.role_resource, 0),
                          pool.role_resource)

    def _max_model_len(self) -> int:
        return min(i.max_model_len for i in self.infos.values())

    async def ready(self) -> ClusterInfo:
        """Waits for the master and every worker; raises if any failed to start."""
        await self._started
        first = next(iter(self.infos.values()))
        return ClusterInfo(
            model_name=self.spec.model.served_name, max_model_len=self._max_model_len(),
            vocab_size=first.vocab_size, block_size=first.block_size, workers=dict(self.infos),
            handles=dict(self.handles), router_node_id=ray.get_runtime_context().get_node_id(),
            master=self._master_status)

    async def master_status(self) -> MasterStatus:
        await self._started
        return await self.master.status.remote()

    def spec_dict(self) -> dict:
        return self._spec_dict

    # ------------------------------------------------------------------ admission
    async def admit(self, request_id: str, prompt_len: int, max_tokens: int,
                    prefix_hashes: list[str], tenant: str | None = None) -> Admission:
        """Admit now, after waiting in the queue, or reject. Every call must be paired with one
        `release(request_id)`, whatever the outcome."""
        await self._started
        if self._gone.pop(request_id, None) is not None:
            return self._reject(request_id, CANCELLED, None, None)
        if self.draining:
            return self._reject(request_id, DRAINING, 1.0, None)
        now = time.monotonic()
        d = self.admission.admit(request_id, prompt_len, max_tokens, now, tenant)
        if d.verdict == Verdict.REJECT:
            return self._reject(request_id, d.reason, d.retry_after_s, d.predicted_ttft_s)
        req = _Placed(prompt_len, max_tokens, prefix_hashes, tenant, now)
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
        return self.admission.in_flight if self.admission else 0

    def abort_in_flight(self) -> int:
        """Stop every admitted request on its workers (the end of a drain that timed out): each
        client gets an error saying so, and the ingress releases the slots. Returns how many."""
        placed = [(rid, w) for rid, req in self.requests.items()
                  for w in (req.prefill, req.decode) if w is not None]
        for request_id, worker in placed:
            self.handles[worker].abort.remote(request_id)
        return len({rid for rid, _ in placed})

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

    def reroute(self, request_id: str, failed: str) -> str | None:
        """`failed` (a worker of this request) died: mark it unhealthy and move the request to the
        best healthy worker of the same role; None if there is none (or the request is gone)."""
        self.worker_failed(failed, "a call to it failed")
        req = self.requests.get(request_id)
        if req is None:
            return None
        loads = [self._load(w) for w in self.infos]
        if self.infos[failed].role == "prefill":
            worker = pick_prefill(loads, req.prefix_hashes, self._block_size())
        else:
            worker = self._pick_decode(loads, req)
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

    def worker_failed(self, worker_id: str, error: str) -> None:
        """A call to the worker failed: stop placing work there until a poll answers again."""
        if self.healthy.get(worker_id):
            log.error("worker %s marked unhealthy: %s", worker_id, error)
        self.healthy[worker_id] = False

    def _reject(self, request_id: str, reason: str, retry_after_s: float | None,
                predicted: float | None) -> Admission:
        self.rejected_total[reason] += 1
        return Admission(request_id, False, reason=reason, retry_after_s=retry_after_s,
                         predicted_ttft_s=predicted)

    def _place(self, request_id: str, req: _Placed, predicted: float | None) -> Admission:
        loads = [self._load(w) for w in self.infos]
        prefill = None if self.spec.colocated else pick_prefill(loads, req.prefix_hashes,
                                                                self._block_size())
        decode = self._pick_decode(loads, req)
        if decode is None or (prefill is None and not self.spec.colocated):
            self.requests.pop(request_id, None)
            self._free_slot(request_id)
            return self._reject(request_id, NO_WORKER, 1.0, predicted)
        req.prefill, req.decode = prefill, decode
        for worker in filter(None, (prefill, decode)):
            self.assigned[worker].add(request_id)
            self.placed_total[worker] += 1
        if prefill is not None:
            self.prefixes.record(prefill, req.prefix_hashes)
        self.admitted_total += 1
        return Admission(request_id, True, prefill, decode, predicted_ttft_s=predicted,
                         queued_s=time.monotonic() - req.arrived)

    def _block_size(self) -> int:
        return next(iter(self.infos.values())).block_size

    def _pick_decode(self, loads: list[WorkerLoad], req: _Placed) -> str | None:
        needed = -(-(req.prompt_len + req.max_tokens) // self._block_size())
        return pick_decode(loads, needed) or pick_decode(
            # Nowhere with room right now: the least busy healthy worker queues it in its engine.
            [replace(w, max_running_seqs=None, free_blocks=w.total_blocks) for w in loads], 0)

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

    # ------------------------------------------------------------------ load polling
    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                await self._poll()
            except Exception:  # never let the poller die: placement would run on stale data
                log.exception("worker poll failed")

    async def _poll(self) -> None:
        ids = list(self.handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.handles[w].report.remote(), POLL_TIMEOUT_S) for w in ids),
            return_exceptions=True)
        for worker_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                self.worker_failed(worker_id, f"poll: {type(result).__name__}: {result}")
                continue
            if not self.healthy[worker_id]:
                # Back (Ray restarted it, or it was only slow): take its info afresh (new pids).
                try:
                    self.infos[worker_id] = await asyncio.wait_for(
                        self.handles[worker_id].ready.remote(), POLL_TIMEOUT_S)
                except Exception as exc:
                    log.warning("worker %s answers but not ready(): %s", worker_id, exc)
                    continue
                log.info("worker %s answers again; marked healthy", worker_id)
            self.healthy[worker_id] = True
            self.reports[worker_id] = result

    # ------------------------------------------------------------------ introspection
    def snapshot(self) -> RouterSnapshot:
        adm = self.admission
        return RouterSnapshot(
            in_flight=adm.in_flight if adm else 0, queued=adm.queued if adm else 0,
            admitted_total=self.admitted_total, rejected_total=dict(self.rejected_total),
            prefill_tok_s=adm.prefill_tok_s if adm else 0.0,
            workers=[WorkerState(self.infos[w], self.healthy[w], self.reports.get(w),
                                 len(self.assigned[w]), self.placed_total[w]) for w in self.infos],
            draining=self.draining)

    async def shutdown(self) -> None:
        """Stop the master this cluster started, the workers and the node store clients (before the
        router is killed)."""
        if self._poller is not None:
            self._poller.cancel()
        if self.master is not None:
            try:
                await self.master.stop.remote()
            except ray.exceptions.RayError as exc:
                log.warning("master supervisor did not stop cleanly: %s", exc)
        for handle in [*self.handles.values(), self.master]:
            if handle is not None:
                ray.kill(handle)
        if self.spec.store.client == "node":
            await stop_node_clients()


def router_options(spec: ClusterSpec) -> dict[str, Any]:
    """Actor options for the one router: named and detached (it outlives any ingress replica) on the
    head node, with room for every queued request's pending admit() call."""
    r = spec.router
    return {"name": ROUTER_NAME, "namespace": NAMESPACE, "lifetime": "detached", "num_cpus": 0,
            "resources": dict(HEAD_NODE), "get_if_exists": True,
            "max_concurrency": max(1000, 2 * (r.max_concurrency + r.max_queue) + 100)}


def get_or_create_router(spec: ClusterSpec):
    """The running router (created from `spec` if there is none)."""
    return ray.remote(Router).options(**router_options(spec)).remote(spec.to_dict())
