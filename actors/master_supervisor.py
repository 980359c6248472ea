"""Mooncake master supervisor actor: runs `mooncake_master` on the spec's ports and restarts it if it
dies, or adopts a master that is already listening there. An external master (`store.master`: the
KubeRay sidecar, `ray up` start commands) is waited for and never started here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray

from ..cluster.kvstore.master import MasterConfig, MooncakeMaster, metadata_answers
from ..cluster.spec import RAY_HEAD, StoreSpec, is_loopback
from ..cluster.supervised_process import tcp_open

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0
EXTERNAL_POLL_S = 1.0


@dataclass(frozen=True)
class MasterStatus:
    managed: bool  # this supervisor runs the process (False: an external master was adopted)
    healthy: bool
    pid: int | None
    rpc_address: str
    metadata_url: str
    restarts: int
    node_id: str  # the Ray node this supervisor (and a managed master) runs on


def master_placement(store: StoreSpec) -> dict[str, float]:
    """Ray resources that put the supervisor on the master's host: the head node for loopback and
    "ray-head" addresses, else the node whose IP is `master_host`."""
    host = store.master_host
    if host == RAY_HEAD or is_loopback(host):
        return {"node:__internal_head__": 0.001}
    return {f"node:{host}": 0.001}


class MasterSupervisor:
    def __init__(self, store: dict, gcs_address: str | None = None) -> None:
        self.store = StoreSpec.model_validate(store)
        self.host = self.store.resolve_master_host(gcs_address)
        self.master: MooncakeMaster | None = None
        self.restarts = 0
        self._monitor: asyncio.Task | None = None

    async def start(self) -> MasterStatus:
        """Adopt a master already answering on the spec's address, or start one; idempotent. An
        external master is waited for (a sidecar may start after the Ray head): starting one here
        would race it for the same ports."""
        if self.store.master == "external":
            await self._wait_for_external()
        elif self.master is None and not await asyncio.to_thread(self._answers):
            cfg = MasterConfig(host=self.store.bind_host, rpc_port=self.store.rpc_port,
                               metadata_port=self.store.metadata_port,
                               metrics_port=self.store.metrics_port)
            self.master = MooncakeMaster(cfg)
            await asyncio.to_thread(self.master.start)
            self._monitor = asyncio.create_task(self._watch())
        elif self.master is None:
            log.info("adopting the mooncake_master already serving at %s", self._rpc_address)
        return await self.status()

    async def _wait_for_external(self) -> None:
        deadline = time.monotonic() + self.store.master_wait_s
        while not await asyncio.to_thread(self._answers):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the external mooncake_master at {self._rpc_address} (store.master: "
                                   f"external) did not answer within {self.store.master_wait_s:.0f}s")
            log.info("waiting for the external mooncake_master at %s", self._rpc_address)
            await asyncio.sleep(EXTERNAL_POLL_S)
        log.info("using the external mooncake_master at %s", self._rpc_address)

    async def status(self) -> MasterStatus:
        if self.master is not None:
            healthy = (await asyncio.to_thread(self.master.health)).ok
            pid = self.master.pid
        else:
            healthy, pid = await asyncio.to_thread(self._answers), None
        return MasterStatus(managed=self.master is not None, healthy=healthy, pid=pid,
                            rpc_address=self._rpc_address,
                            metadata_url=self._metadata_url, restarts=self.restarts,
                            node_id=ray.get_runtime_context().get_node_id())

    async def stop(self) -> None:
        """Stop a master this supervisor started (an adopted one is left alone)."""
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        if self.master is not None:
            await asyncio.to_thread(self.master.stop)

    @property
    def _rpc_address(self) -> str:
        return f"{self.host}:{self.store.rpc_port}"

    @property
    def _metadata_url(self) -> str:
        return f"http://{self.host}:{self.store.metadata_port}/metadata"

    def _answers(self) -> bool:
        return tcp_open(self.host, self.store.rpc_port) and metadata_answers(self._metadata_url)

    async def _watch(self) -> None:
        # The store's contents die with the process; clients re-register, and decode recomputes
        # whatever it cannot load meanwhile.
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if self.master is not None and not self.master.running():
                log.error("mooncake_master exited (log: %s); restarting it", self.master.log_path)
                try:
                    await asyncio.to_thread(self.master.restart)
                    self.restarts += 1
                except Exception:
                    log.exception("mooncake_master restart failed; retrying")
