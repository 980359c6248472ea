"""The base both worker actors share: one engine (with its store connector and TP ranks) on one node,
and what it tells the controller about itself (`WorkerInfo` once, `WorkerReport` on every poll).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .engine_loop import EngineLoop

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker is, reported once it is ready."""
    worker_id: str
    role: Role
    node_id: str
    node_ip: str
    pid: int
    max_model_len: int
    vocab_size: int
    block_size: int
    num_total_blocks: int
    block_nbytes: int
    max_num_seqs: int
    model_fingerprint: str  # salts the engine's block hashes (and so the store keys)
    kv_store: bool  # connected to the Mooncake store, every TP rank (else decode recomputes prompts)
    tp_pids: tuple[int, ...] = ()  # processes of TP ranks 1.. (this actor is rank 0)
    deployment_id: str = ""  # salts the block hashes with the model's fingerprint
    threads: int = 0  # torch intra-op threads the engine (and its CPU kernels) runs with


@dataclass(frozen=True)
class WorkerReport:
    """A worker's load, polled by the router; `stats` is the engine's EngineStats as a dict."""
    worker_id: str
    role: Role
    running_seqs: int
    waiting_seqs: int
    free_blocks: int
    total_blocks: int
    stats: dict[str, Any] = field(default_factory=dict)



class EngineWorker:
    """Base of the prefill and decode actors: one engine (with its store connector) on one node.

    With engine.tp_size N the actor is TP rank 0 and starts ranks 1..N-1 on its node
    (`TPFollowers`), which step in lockstep with it; if one of them dies the actor exits."""

    role: Role

    def __init__(self, spec: dict, worker_id: str) -> None:
        import ray

        from ..cluster.kvstore.connector import deployment_id, make_connector
        from ..cluster.spec import ClusterSpec
        from ..engine.llm_engine import LLMEngine
        from .tp_followers import TPFollowers

        self.spec = ClusterSpec.from_dict(spec)
        self.worker_id = worker_id
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        config = self.spec.engine_config(deployment_id=deployment_id())
        if config.threads is None:
            # Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPUs, which would leave a worker
            # that owns its whole node on one core: take the host's cores, shared with the other
            # workers placed on it and with the TP ranks.
            config = replace(config, threads=self._default_threads(config.tp_size))
        store_host = self._store_host(ctx.gcs_address)
        # node mode: attach to the node's store client first, so the KV cache is allocated in memory
        # it shares (the TP ranks then find it running too)
        backend = self._node_store(store_host, ctx.gcs_address) if self.spec.store.client == "node" else None
        if backend is not None:
            config = replace(config, kv_allocator=backend.allocate)
        self.followers: TPFollowers | None = None
        if config.tp_size > 1:
            self.followers = TPFollowers(spec, worker_id, config.tp_size, config.threads,
                                         store_host, ctx.gcs_address, on_exit=self._die)
            os.environ.update(self.followers.env)  # where this rank meets them

        def build() -> LLMEngine:
            """The engine and its store connector, built on the engine's thread (see EngineLoop)."""
            engine = LLMEngine(config)
            self.connector = make_connector(self.spec.store, engine, local_hostname=store_host,
                                            gcs_address=ctx.gcs_address, backend=backend)
            return engine

        try:
            self.loop = EngineLoop(build, name=f"{worker_id}-engine", mirror=self.followers,
                                   on_fatal=lambda exc: self._die(f"{type(exc).__name__}: {exc}"))
            followers_stored = self.followers.wait_ready() if self.followers else []
        except BaseException:
            if self.followers is not None:
                self.followers.kill()
            raise
        self.engine = self.loop.engine
        self.kv_store = self.connector is not None and all(followers_stored)
        log.info("%s ready on node %s (TP %d, %d threads, KV store: %s)", worker_id, self.node_ip,
                 config.tp_size, config.threads, "connected" if self.kv_store else "none")

    def _default_threads(self, tp_size: int) -> int:
        """engine.threads when the spec leaves it unset, from what Ray says about the nodes."""
        import ray

        from ..cluster.policy.engine_threads import NodeView, engine_threads, workers_on_host

        nodes = {n["NodeID"]: NodeView(hostname=n.get("NodeManagerHostname", ""),
                                       cpus=n.get("Resources", {}).get("CPU", 0.0),
                                       resources=frozenset(n.get("Resources", {})))
                 for n in ray.nodes() if n.get("Alive")}
        me = nodes.get(self.node_id, NodeView(hostname="", cpus=0.0, resources=frozenset()))
        pools = {}
        for role in ("prefill", "decode"):
            pool = self.spec.pool(role)
            pools[pool.role_resource] = pools.get(pool.role_resource, 0) + pool.replicas
        workers = workers_on_host(nodes.values(), me.hostname, pools)
        return engine_threads(len(os.sched_getaffinity(0)), me.cpus, workers, tp_size)

    def _node_store(self, store_host: str, gcs_address: str):
        """This node's store client (started if no worker here has yet) and a client attached to
        it; None, and prompts are recomputed, if either fails."""
        from ..cluster.kvstore.connector import open_backend
        from .node_client_supervisor import ensure_node_client

        try:
            ensure_node_client(self.spec.store, store_host, self.node_id, gcs_address)
        except Exception as exc:
            log.warning("node store client unavailable (%s): decode will recompute prompts", exc)
            return None
        return open_backend(self.spec.store, store_host, gcs_address)

    def _store_host(self, gcs_address: str) -> str:
        from ..cluster.spec import is_loopback

        # Peers reach this client at the address Mooncake advertises: loopback when the whole store is
        # on one machine, else this node's IP on the cluster network.
        master = self.spec.store.resolve_master_host(gcs_address)
        return "127.0.0.1" if is_loopback(master) else self.node_ip

    def _die(self, reason: str) -> None:
        """A TP rank is gone or out of step: no step can run any more. Exit the process, so the
        router marks this worker unhealthy and the ingress moves its requests elsewhere, exactly as
        for a worker that crashed (the followers exit with it)."""
        log.error("%s: %s; the worker exits", self.worker_id, reason)
        if self.followers is not None:
            self.followers.kill()
        os._exit(1)

    async def ready(self) -> WorkerInfo:
        """Answers once the engine is loaded (the actor's constructor has run)."""
        return self.info()

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, node_id=self.node_id, node_ip=self.node_ip,
            pid=os.getpid(), max_model_len=e.max_model_len, vocab_size=e.hf_config["vocab_size"],
            block_size=e.config.block_size, num_total_blocks=e.block_manager.num_blocks,
            block_nbytes=e.block_nbytes, max_num_seqs=e.config.max_num_seqs,
            model_fingerprint=e.fingerprint, kv_store=self.kv_store, deployment_id=e.config.deployment_id,
            tp_pids=self.followers.pids if self.followers else (), threads=e.threads)

    def report(self) -> WorkerReport:
        s = self.loop.stats()
        return WorkerReport(
            worker_id=self.worker_id, role=self.role, running_seqs=s.num_running,
            waiting_seqs=s.num_waiting, free_blocks=s.num_free_blocks, total_blocks=s.num_total_blocks,
            stats=asdict(s))

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def abort_all(self) -> int:
        """Stop every request here (a drain that timed out); returns how many."""
        return self.loop.abort_all()
