"""Node store client supervisor actor (store.client "node"): runs the node's one `mooncake_client`
on the spec's ports and restarts it if it dies. The first worker on a node creates it, by name so
that the other workers there find it; it is detached, so a worker that dies (and is restarted) does
not take the node's segment, and its neighbours' attachment, with it. The controller stops them all on
shutdown (`stop_node_clients`).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray

from ..cluster.kvstore.node_client import MooncakeNodeClient, NodeClientConfig
from ..cluster.spec import StoreSpec
from .names import NAMESPACE, NODE_CLIENT_PREFIX, node_client_name

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NodeClientStatus:
    healthy: bool
    pid: int | None
    rpc_address: str  # where workers attach (StoreConfig.node_client_address)
    segment: str  # the node's segment (StoreConfig.node_segment)
    restarts: int


class NodeClientSupervisor:
    def __init__(self, store: dict, host: str, gcs_address: str | None = None) -> None:
        spec = StoreSpec.model_validate(store)
        self.client = MooncakeNodeClient(NodeClientConfig(
            master_server_addr=spec.master_address(gcs_address),
            metadata_server=spec.metadata_url(gcs_address), host=host,
            port=spec.node_client_port, transfer_port=spec.node_client_transfer_port,
            protocol=spec.protocol, device_name=spec.device_name,
            global_segment_size=spec.global_segment_mib << 20))
        self.restarts = 0
        self._starting = asyncio.Lock()  # the node's workers may all ask at once
        self._monitor: asyncio.Task | None = None

    async def start(self) -> NodeClientStatus:
        """Start the node client unless it runs; idempotent."""
        async with self._starting:
            if not self.client.running():
                await asyncio.to_thread(self.client.start)
            if self._monitor is None:
                self._monitor = asyncio.create_task(self._watch())
        return self.status()

    def status(self) -> NodeClientStatus:
        return NodeClientStatus(healthy=self.client.healthy(), pid=self.client.pid,
                                rpc_address=self.client.rpc_address, segment=self.client.segment_name,
                                restarts=self.restarts)

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        await asyncio.to_thread(self.client.stop)

    async def _watch(self) -> None:
        # Its segment's blocks die with it; workers attached to the old process stay unable to reach
        # the store (mooncake 0.3.13 cannot re-attach them) and recompute prompts, while workers
        # started later attach to the new one.
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if not self.client.running():
                log.error("mooncake_client exited (log: %s); restarting it", self.client.log_path)
                try:
                    async with self._starting:
                        await asyncio.to_thread(self.client.restart)
                    self.restarts += 1
                except Exception:
                    log.exception("mooncake_client restart failed; retrying")


def ensure_node_client(store: StoreSpec, host: str, node_id: str,
                       gcs_address: str | None = None) -> NodeClientStatus:
    """From a worker on node `node_id`: start this node's store client (or find the one already
    running there) and wait until workers can attach. Raises if it cannot start."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    supervisor = ray.remote(NodeClientSupervisor).options(
        name=node_client_name(host, store.node_client_port), namespace=NAMESPACE,
        lifetime="detached", get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(store.model_dump(), host, gcs_address)
    status = ray.get(supervisor.start.remote(), timeout=START_TIMEOUT_S)
    if not status.healthy:
        raise RuntimeError(f"the node store client at {status.rpc_address} is not healthy")
    return status


async def stop_node_clients() -> int:
    """Stop every node store client of this cluster (it is shutting down); returns how many."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(NODE_CLIENT_PREFIX)]
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            await handle.stop.remote()
        except (ValueError, ray.exceptions.RayError) as exc:  # gone meanwhile, or dying
            log.warning("node store client %s did not stop cleanly: %s", name, exc)
            continue
        ray.kill(handle)
    return len(names)
