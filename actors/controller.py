"""Controller actor: owns the cluster's processes — the Mooncake master supervisor, every worker, the
node store clients and the router — starts them, polls the workers' health and load, and stops them.

The router decides; the controller keeps it told (one `update_workers` call per poll). The router owns
nothing, so Ray restarts it when its process dies: the workers and the master live on, the next poll
gives it the workers' state and the ingress replicas' leases give it their requests back.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import ray

from ..cluster.kvstore.connector import COMMIT_SECRET_ENV, DEPLOYMENT_ID_ENV
from ..cluster.spec import ClusterSpec, SpecChangeRefused
from .decode_worker import DecodeWorker
from .master_supervisor import MasterStatus, MasterSupervisor, master_placement
from .names import CONTROLLER_NAME, HEAD_NODE, MASTER_NAME, NAMESPACE, ROUTER_NAME
from .node_client_supervisor import stop_node_clients
from .prefill_worker import PrefillWorker
from .router import Router
from .worker import WorkerInfo, WorkerReport

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
POLL_TIMEOUT_S = 5.0
FAILED_START_LINGER_S = 5.0  # a controller whose start failed answers ready() (with the error) this long


def _router_calls(spec: ClusterSpec) -> int:
    """The router's actor concurrency: room for every queued request's pending admit() call."""
    r = spec.router
    return max(1000, 2 * (r.max_concurrency + r.max_queue) + 100)


@dataclass(frozen=True)
class ClusterInfo:
    """What the ingress needs to know about the running cluster."""
    model_name: str
    model_fingerprint: str  # the engines' (salts the prefix hashes, as in the store's keys)
    deployment_id: str  # the workers' (salts them too)
    max_model_len: int
    vocab_size: int
    block_size: int
    workers: dict[str, WorkerInfo]
    handles: dict[str, Any] = field(repr=False)  # worker id -> ActorHandle
    router: Any = field(default=None, repr=False)  # ActorHandle
    master: MasterStatus | None = None
    controller_node_id: str = ""


class Controller:
    """Create with `get_or_create_controller(spec)`; `ready()` answers once everything is up."""

    async def __init__(self, spec: dict) -> None:
        self.spec = ClusterSpec.from_dict(spec)
        self._spec_dict = self.spec.to_dict()
        self._spec_version = 0  # redeploys applied (the router ignores an older spec arriving late)
        self.master = None
        self.router = None
        self.handles: dict[str, Any] = {}
        self.infos: dict[str, WorkerInfo] = {}
        self.healthy: dict[str, bool] = {}
        self.reports: dict[str, WorkerReport] = {}
        self._master_status: MasterStatus | None = None
        self._poller: asyncio.Task | None = None
        self._started = asyncio.create_task(self._start_or_leave())

    # ------------------------------------------------------------------ startup
    async def _start_or_leave(self) -> None:
        """Start everything; on failure stop what did start and leave (soon after the callers of
        `ready()` hear why), so the next ingress replica creates a fresh controller instead of
        getting this broken one until `pdcluster down`."""
        try:
            await self._start()
        except BaseException:
            log.exception("cluster start failed; this controller stops")
            try:
                await self.shutdown()
            finally:
                me = ray.get_runtime_context().current_actor
                asyncio.get_running_loop().call_later(FAILED_START_LINGER_S, ray.kill, me)
            raise

    async def _start(self) -> None:
        gcs = ray.get_runtime_context().gcs_address
        self.master = ray.remote(MasterSupervisor).options(
            name=MASTER_NAME, namespace=NAMESPACE, num_cpus=0,
            resources=master_placement(self.spec.store)).remote(self._spec_dict["store"], gcs)
        self._master_status = await self.master.start.remote()
        self._check_pools()
        actors = {"prefill": ray.remote(PrefillWorker), "decode": ray.remote(DecodeWorker)}
        # This deployment's key for the store's commit records: records another deployment (or
        # anyone else with access to the store) wrote are not trusted. Its id salts the store keys.
        secret = {COMMIT_SECRET_ENV: secrets.token_hex(32), DEPLOYMENT_ID_ENV: secrets.token_hex(8)}
        for role in ("prefill", "decode"):
            options = self.spec.worker_actor_options(role)
            env = options.get("runtime_env", {})
            options["runtime_env"] = {**env, "env_vars": {**env.get("env_vars", {}), **secret}}
            for i in range(self.spec.pool(role).replicas):
                worker_id = f"{role}-{i}"
                self.handles[worker_id] = actors[role].options(
                    name=worker_id, namespace=NAMESPACE, max_concurrency=1000,
                    **options).remote(self._spec_dict, worker_id)
        infos = await asyncio.gather(*(h.ready.remote() for h in self.handles.values()))
        self.infos = {i.worker_id: i for i in infos}
        self.healthy = dict.fromkeys(self.infos, True)
        self._router_calls = _router_calls(self.spec)
        self.router = ray.remote(Router).options(
            name=ROUTER_NAME, namespace=NAMESPACE, num_cpus=0, resources=dict(HEAD_NODE),
            # Restarted when its process dies; calls made meanwhile wait for the new one (every
            # method is safe to run again: admit on a new router is a new admission, release and
            # renew are idempotent).
            max_restarts=-1, max_task_retries=-1, max_concurrency=self._router_calls,
        ).remote(self._spec_dict, list(infos), ray.get_runtime_context().current_actor)
        await self._poll()
        self._poller = asyncio.create_task(self._poll_forever())
        log.info("cluster ready: %s", ", ".join(f"{i.worker_id}@{i.node_ip}" for i in infos))

    def _check_pools(self) -> None:
        for problem in self.spec.pool_shortfalls(ray.cluster_resources()):
            log.error("%s", problem)

    async def ready(self) -> ClusterInfo:
        """Waits for the master, every worker and the router; raises if any failed to start."""
        await self._started
        first = next(iter(self.infos.values()))
        return ClusterInfo(
            model_name=self.spec.model.served_name, model_fingerprint=first.model_fingerprint,
            deployment_id=first.deployment_id,
            max_model_len=min(i.max_model_len for i in self.infos.values()),
            vocab_size=first.vocab_size, block_size=first.block_size, workers=dict(self.infos),
            handles=dict(self.handles), router=self.router, master=self._master_status,
            controller_node_id=ray.get_runtime_context().get_node_id())

    async def master_status(self) -> MasterStatus:
        await self._started
        return await self.master.status.remote()

    def spec_dict(self) -> dict:
        return self._spec_dict

    async def reconfigure(self, spec: dict) -> list[str]:
        """Take a redeploy's spec (a new ingress replica's); returns the fields that changed. The
        router's settings change in place (its admission state kept) and each ingress replica reads
        its own serve section; a change to anything else (model, engine, pools, store) needs new
        workers, and is refused naming the fields."""
        await self._started
        new = ClusterSpec.from_dict(spec)
        self.spec.check_redeploy(new)
        changed = self.spec.changed_fields(new)
        if _router_calls(new) > self._router_calls:
            raise SpecChangeRefused(
                "router.max_concurrency + router.max_queue grew past what the running router takes "
                f"({(self._router_calls - 100) // 2}); stop it first (`pdcluster down`)")
        if changed:
            self.spec, self._spec_dict = new, new.to_dict()
            self._spec_version += 1
            await self.router.reconfigure.remote(self._spec_dict, self._spec_version)
            log.warning("redeployed spec applied: %s", ", ".join(changed))
        return changed

    # ------------------------------------------------------------------ health
    def worker_failed(self, worker_id: str, error: str) -> None:
        """A call to the worker failed: it counts as unhealthy until it answers ready() again."""
        if self.healthy.get(worker_id):
            log.error("worker %s marked unhealthy: %s", worker_id, error)
        self.healthy[worker_id] = False

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
        await self.router.update_workers.remote(list(self.infos.values()), dict(self.healthy),
                                                dict(self.reports), self._spec_dict, self._spec_version)

    # ------------------------------------------------------------------ shutdown
    async def abort_all(self) -> int:
        """Stop every request on every worker (the end of a drain that timed out): each client gets
        an error saying so, and the ingress releases the slots. Returns how many were stopped."""
        counts = await asyncio.gather(*(h.abort_all.remote() for h in self.handles.values()),
                                      return_exceptions=True)
        return sum(c for c in counts if isinstance(c, int))

    async def shutdown(self) -> None:
        """Stop the master this cluster started, the workers, the router and the node store
        clients (before the controller itself is killed)."""
        if self._poller is not None:
            self._poller.cancel()
        if self.master is not None:
            try:
                await self.master.stop.remote()
            except ray.exceptions.RayError as exc:
                log.warning("master supervisor did not stop cleanly: %s", exc)
        for handle in [*self.handles.values(), self.master, self.router]:
            if handle is not None:
                ray.kill(handle)  # no_restart: the router stays down

        if self.spec.store.client == "node":
            await stop_node_clients()


def get_or_create_controller(spec: ClusterSpec):
    """The running controller (created from `spec` if there is none): named and detached, so it
    outlives any ingress replica, on the head node."""
    return ray.remote(Controller).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        resources=dict(HEAD_NODE), get_if_exists=True, max_concurrency=1000,
    ).remote(spec.to_dict())
