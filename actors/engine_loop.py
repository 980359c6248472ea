"""One engine driven by one thread, fed from asyncio: the core both worker actors share.

The engine is not thread-safe, so a single background thread owns it: it applies queued add/abort
commands, runs `step()` while there is work, sleeps on a condition when idle, and hands each step's
outputs to the actor's event loop, where they land in per-request asyncio queues.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from pdcluster.engine.outputs import RequestOutput
from pdcluster.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
CLOSED_MEMORY = 4096  # finished/aborted request ids remembered per engine


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
    kv_store: bool  # connected to the Mooncake store, every TP rank (else decode recomputes prompts)
    tp_pids: tuple[int, ...] = ()  # processes of TP ranks 1.. (this actor is rank 0)


@dataclass(frozen=True)
class WorkerReport:
    """A worker's load, polled by the router; `stats` is the engine's EngineStats as a dict."""
    worker_id: str
    role: Role
    running_seqs: int
    waiting_seqs: int
    free_blocks: int
    total_blocks: int
    outstanding_prefill_tokens: int
    stats: dict[str, Any] = field(default_factory=dict)


class RequestAborted(Exception):
    """Put in a request's queue when it is aborted, so a consumer still waiting on it wakes up."""


class Mirror(Protocol):
    """The other tensor-parallel ranks of this engine. Each iteration they get the same command
    batch, applied in the same order, and step when this engine steps, so every collective inside
    the model (and the KV import/export agreements) has all ranks present."""

    def apply(self, commands: list[tuple], step: bool) -> None:
        """Forward one iteration without waiting for it; raises if a rank is gone."""


class EngineLoop:
    """Runs `engine` on a daemon thread. `submit`/`abort` must be called from the event loop thread
    that owns the returned queues (the actor's loop); results come back through those queues.

    With a `mirror` (tensor parallel) a failed step is fatal — the ranks' process group is broken —
    and `on_fatal(exc)` is called (the worker exits, so its callers fail over); without one the
    loop fails every request and stops."""

    def __init__(self, engine, name: str = "engine", mirror: Mirror | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.mirror = mirror
        self._on_fatal = on_fatal
        self._cond = threading.Condition()
        self._commands: deque[tuple] = deque()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        # prompt tokens of requests that have not produced their first output yet (event-loop side)
        self._unprefilled: dict[str, int] = {}
        self._stats = engine.stats()
        # Recently aborted or finished ids: an abort can reach the actor before the call that submits
        # the request (Ray does not order an async actor's calls), and must still win.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._active: set[str] = set()  # requests inside the engine (engine thread only)
        self._broken: BaseException | None = None  # set once lockstep with the TP ranks is lost
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               **add_kwargs: Any) -> asyncio.Queue:
        """Validate and queue a request; its RequestOutputs (or an exception) arrive in the queue.

        Raises ValueError at once when the request cannot fit this engine."""
        # validate_prompt only reads fixed sizes (vocab, context, cache), so calling it from this
        # thread is safe; add_request on the engine thread re-checks and reports through the queue.
        self.engine.validate_prompt(prompt_token_ids, params)
        if self._broken is not None:
            raise RuntimeError(f"tensor-parallel engine failed: {self._broken}")
        if request_id in self._closed:
            raise RequestAborted(request_id)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self._loop = self._loop or asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._unprefilled[request_id] = len(prompt_token_ids)
        self._command(("add", request_id, list(prompt_token_ids), params, add_kwargs))
        return queue

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished requests."""
        self._unprefilled.pop(request_id, None)
        self._close(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestAborted(request_id))
            self._command(("abort", request_id))

    @property
    def outstanding_prefill_tokens(self) -> int:
        return sum(self._unprefilled.values())

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def stats(self):
        """The engine's stats as of its last step (a snapshot: the engine is not touched here)."""
        return self._stats

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _close(self, request_id: str) -> None:
        self._closed[request_id] = None
        if len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _command(self, cmd: tuple) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is None:
                continue  # aborted meanwhile: nobody is listening
            self._unprefilled.pop(request_id, None)
            if isinstance(item, BaseException) or item.finished:
                del self._queues[request_id]
                self._close(request_id)
            queue.put_nowait(item)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stopped or self._commands or engine.has_unfinished_requests()):
                    self._cond.wait()
                if self._stopped:
                    return
                commands = list(self._commands)
                self._commands.clear()
            results: list[tuple[str, RequestOutput | BaseException]] = []
            for cmd in commands:
                self._apply(cmd, results)
            step = engine.has_unfinished_requests()
            if self.mirror is not None:
                try:
                    self.mirror.apply(commands, step)
                except Exception as exc:
                    self._fatal(exc)
                    return
            if step:
                try:
                    outputs = engine.step()
                except Exception as exc:
                    if self.mirror is not None:  # the ranks' collectives are out of step for good
                        self._fatal(exc)
                        return
                    # a broken step fails its requests, not the worker
                    log.exception("engine step failed; failing %d requests", len(self._active))
                    for request_id in self._active:
                        engine.abort_request(request_id)
                        results.append((request_id, RuntimeError(f"engine step failed: {exc}")))
                    self._active.clear()
                else:
                    for out in outputs:
                        if out.finished:
                            self._active.discard(out.request_id)
                        results.append((out.request_id, out))
            self._stats = engine.stats()
            if results:
                self._post(results)

    def _fatal(self, exc: BaseException) -> None:
        """Lockstep with the other TP ranks is lost (a rank died, or a collective timed out)."""
        log.error("tensor-parallel ranks out of step (%s: %s): the engine stops",
                  type(exc).__name__, exc)
        self._broken = exc
        if self._on_fatal is not None:
            # the worker ends itself: its callers see it die and fail over, rather than
            # getting these requests' errors first
            self._on_fatal(exc)
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fail_all, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(RuntimeError(f"tensor-parallel engine failed: {exc}"))
            self._close(request_id)
        self._queues.clear()
        self._unprefilled.clear()

    def _apply(self, cmd: tuple, results: list) -> None:
        if cmd[0] == "add":
            _, request_id, ids, params, kwargs = cmd
            try:
                self.engine.add_request(request_id, prompt_token_ids=ids, params=params, **kwargs)
            except ValueError as exc:  # the request does not fit this engine: the client's 400
                results.append((request_id, exc))
            except Exception as exc:  # a bug: fail this request, keep the engine thread alive
                log.exception("add_request(%s) failed", request_id)
                results.append((request_id, RuntimeError(f"could not add the request: {exc}")))
            else:
                self._active.add(request_id)
        else:
            self.engine.abort_request(cmd[1])
            self._active.discard(cmd[1])

    def _post(self, results: list) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check (actor exiting)
            loop.call_soon_threadsafe(self._deliver, results)



class EngineWorker:
    """Base of the prefill and decode actors: one engine (with its store connector) on one node.

    With engine.tp_size N the actor is TP rank 0 and starts ranks 1..N-1 on its node
    (`TPFollowers`), which step in lockstep with it; if one of them dies the actor exits."""

    role: Role

    def __init__(self, spec: dict, worker_id: str) -> None:
        import ray

        from pdcluster.actors.tp_followers import TPFollowers
        from pdcluster.cluster.kv_connector import make_connector
        from pdcluster.cluster.spec import ClusterSpec
        from pdcluster.engine.llm_engine import LLMEngine

        self.spec = ClusterSpec.from_dict(spec)
        self.worker_id = worker_id
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        config = self.spec.engine_config()
        if config.threads is None:
            # Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPUs, which would leave a worker
            # that owns its whole node on one core; TP ranks share the node's cores.
            config = replace(config, threads=max(1, len(os.sched_getaffinity(0)) // config.tp_size))
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
        try:
            self.engine = LLMEngine(config)
            self.connector = make_connector(self.spec.store, self.engine, local_hostname=store_host,
                                            gcs_address=ctx.gcs_address, backend=backend)
            followers_stored = self.followers.wait_ready() if self.followers else []
        except BaseException:
            if self.followers is not None:
                self.followers.kill()
            raise
        self.kv_store = self.connector is not None and all(followers_stored)
        self.loop = EngineLoop(self.engine, name=f"{worker_id}-engine", mirror=self.followers,
                               on_fatal=lambda exc: self._die(f"{type(exc).__name__}: {exc}"))
        log.info("%s ready on node %s (TP %d, KV store: %s)", worker_id, self.node_ip,
                 config.tp_size, "connected" if self.kv_store else "none")

    def _node_store(self, store_host: str, gcs_address: str):
        """This node's store client (started if no worker here has yet) and a client attached to
        it; None, and prompts are recomputed, if either fails."""
        from pdcluster.actors.node_client import ensure_node_client
        from pdcluster.cluster.kv_connector import open_backend

        try:
            ensure_node_client(self.spec.store, store_host, self.node_id, gcs_address)
        except Exception as exc:
            log.warning("node store client unavailable (%s): decode will recompute prompts", exc)
            return None
        return open_backend(self.spec.store, store_host, gcs_address)

    def _store_host(self, gcs_address: str) -> str:
        from pdcluster.cluster.spec import is_loopback

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
            kv_store=self.kv_store, tp_pids=self.followers.pids if self.followers else ())

    def report(self) -> WorkerReport:
        s = self.loop.stats()
        return WorkerReport(
            worker_id=self.worker_id, role=self.role, running_seqs=s.num_running,
            waiting_seqs=s.num_waiting, free_blocks=s.num_free_blocks, total_blocks=s.num_total_blocks,
            outstanding_prefill_tokens=self.loop.outstanding_prefill_tokens, stats=asdict(s))

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)
