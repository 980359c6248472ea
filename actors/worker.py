"""The base both worker actors share: one engine (with its store connector and TP ranks) on one node,
and what it tells the controller about itself (`WorkerInfo` once, `WorkerReport` on every poll).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .core_share import CoreShare
from .engine_core import CoreSetup, EngineCore, build_engine, engine_facts
from .engine_loop import EngineLoop

if TYPE_CHECKING:
    from .tp_followers import TPFollowers

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
    most_threads: int = 0  # > threads: its steps take up to this many while the host's others idle
    engine_pid: int = 0  # the engine's own process (engine.core "process"); 0: it runs in `pid`


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
    taken_at: float = 0.0  # the worker's wall clock (time.time()) when it took the report



class EngineWorker:
    """Base of the prefill and decode actors: one engine (with its store connector) on one node.

    The engine runs in a child process of the actor (`EngineCore`; engine.core "process", the
    default for tp_size 1), or on a thread of the actor ("thread"). With engine.tp_size N it runs
    on a thread, the actor is TP rank 0 and starts ranks 1..N-1 on its node (`TPFollowers`), which
    step in lockstep with it; if one of them, or the engine's process, dies, the actor exits."""

    role: Role

    def __init__(self, spec: dict, worker_id: str) -> None:
        import ray

        from ..cluster.kvstore.connector import deployment_id
        from ..cluster.spec import ClusterSpec

        self.spec = ClusterSpec.from_dict(spec)
        self.worker_id = worker_id
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        config = self.spec.engine_config(deployment_id=deployment_id())
        most = 0   # with engine.threads unset: the threads its steps may take while the host's others idle
        if config.threads is None:
            # Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPUs, which would leave a worker
            # that owns its whole node on one core: take the host's cores, shared with the other
            # workers placed on it and with the TP ranks.
            share, most = self._default_threads(config.tp_size)
            config = replace(config, threads=share)
        store_host = self._store_host(ctx.gcs_address)
        # node mode: the node's store client runs first, so the KV cache is allocated in memory it
        # shares (the TP ranks then find it running too)
        node_store = self.spec.store.client == "node" and self._node_store(store_host, ctx.gcs_address)
        self.most_threads = most
        self.core = self.spec.engine.core or ("thread" if config.tp_size > 1 else "process")
        self.followers: TPFollowers | None = None
        if self.core == "process":
            self.loop = EngineCore(CoreSetup(spec, worker_id, config, store_host, ctx.gcs_address,
                                             node_store, most), on_exit=self._die)
            self.facts = self.loop.facts
            self.kv_store = self.facts["kv_store"]
        else:
            self._start_thread_core(spec, config, store_host, ctx.gcs_address, node_store, most)
        log.info("%s ready on node %s (TP %d, %d threads, engine in %s, KV store: %s)", worker_id,
                 self.node_ip, config.tp_size, config.threads,
                 "its own process" if self.core == "process" else "the worker's process",
                 "connected" if self.kv_store else "none")

    def _start_thread_core(self, spec: dict, config, store_host: str, gcs_address: str,
                           node_store: bool, most: int) -> None:
        """The engine on a thread of this process, stepping its TP followers (if any) in lockstep."""
        from .tp_followers import TPFollowers

        if config.tp_size > 1:
            self.followers = TPFollowers(spec, self.worker_id, config.tp_size, config.threads,
                                         store_host, gcs_address, on_exit=self._die)
            os.environ.update(self.followers.env)  # where this rank meets them
        built = {}

        def build():
            """The engine and its store connector, built on the engine's thread (see EngineLoop)."""
            engine, built["connector"] = build_engine(self.spec.store, config, store_host,
                                                      gcs_address, node_store)
            return engine

        try:
            cores = None if self.followers else CoreShare.open(
                config.threads, most, stream_interval=self.spec.engine.stream_interval)
            self.loop = EngineLoop(build, name=f"{self.worker_id}-engine", mirror=self.followers,
                                   on_fatal=lambda exc: self._die(f"{type(exc).__name__}: {exc}"),
                                   cores=cores, stream_interval=self.spec.engine.stream_interval)
            followers_stored = self.followers.wait_ready() if self.followers else []
        except BaseException:
            if self.followers is not None:
                self.followers.kill()
            raise
        self.facts = engine_facts(self.loop.engine, built["connector"])
        self.kv_store = self.facts["kv_store"] and all(followers_stored)

    def _default_threads(self, tp_size: int) -> tuple[int, int]:
        """With engine.threads unset, from what Ray says about the nodes: the threads this engine
        always has (its share of the host), and the most its steps may take while the host's other
        engines idle (0: it keeps its share, see `most_threads`)."""
        import ray

        from ..cluster.policy.engine_threads import (NodeView, engine_threads, most_threads,
                                                     usable_cores, workers_on_host)

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
        cores = len(os.sched_getaffinity(0))
        share = engine_threads(cores, me.cpus, workers, tp_size)
        return share, most_threads(self.role, share, usable_cores(cores, me.cpus), tp_size)

    def _node_store(self, store_host: str, gcs_address: str) -> bool:
        """Whether this node's store client runs (started if no worker here has yet); if it does
        not, prompts are recomputed."""
        from .node_client_supervisor import ensure_node_client

        try:
            ensure_node_client(self.spec.store, store_host, self.node_id, gcs_address)
        except Exception as exc:
            log.warning("node store client unavailable (%s): decode will recompute prompts", exc)
            return False
        return True

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
        if isinstance(getattr(self, "loop", None), EngineCore):
            self.loop.kill()
        os._exit(1)

    async def ready(self) -> WorkerInfo:
        """Answers once the engine is loaded (the actor's constructor has run)."""
        return self.info()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, node_id=self.node_id, node_ip=self.node_ip,
            pid=os.getpid(), **{**self.facts, "kv_store": self.kv_store},
            tp_pids=self.followers.pids if self.followers else (),
            engine_pid=self.loop.pid if self.core == "process" else 0,
            most_threads=self.most_threads)

    def report(self) -> WorkerReport:
        s = self.loop.stats()
        return WorkerReport(
            worker_id=self.worker_id, role=self.role, running_seqs=s.num_running,
            waiting_seqs=s.num_waiting, free_blocks=s.num_free_blocks, total_blocks=s.num_total_blocks,
            stats=asdict(s), taken_at=time.time())

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def abort_all(self) -> int:
        """Stop every request here (a drain that timed out); returns how many."""
        return self.loop.abort_all()
