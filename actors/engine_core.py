"""The engine core in its own process: a worker actor's engine steps in a child process, so the
actor's serving work (Ray calls, the output streams, their pickling) never holds the GIL the
engine's Python needs between kernels.

The actor keeps the event-loop half (`EngineFront`: sinks, ordering, aborts) and sends each command
down a pipe; the child runs the same `EngineLoop` on its own thread and sends back one message per
engine step, all that step's results and the engine's stats together. A reader thread in the actor
hands them to the event loop. The child exits when the pipe closes (its actor is gone); the actor
exits when the child does, so the router sees a dead worker and fails its requests over, as for
any crashed worker. Tensor-parallel workers keep the engine on a thread of the actor (rank 0 steps
its followers in lockstep from there).

Run as `python -m pdcluster.actors.engine_core FD`: FD is the child's end of the pipe.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from .core_share import CoreShare
from .engine_loop import EngineFront, EngineLoop

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # loading a large checkpoint takes a while
STOP_TIMEOUT_S = 10.0


def engine_facts(engine, connector) -> dict[str, Any]:
    """What the worker reports about its engine, read once it is built: the `WorkerInfo` fields
    the engine knows, by name, and whether its store connector is attached (`kv_store`)."""
    return dict(
        max_model_len=engine.max_model_len, vocab_size=engine.hf_config["vocab_size"],
        block_size=engine.config.block_size, num_total_blocks=engine.block_manager.num_blocks,
        block_nbytes=engine.block_nbytes, max_num_seqs=engine.config.max_num_seqs,
        model_fingerprint=engine.fingerprint, deployment_id=engine.config.deployment_id,
        threads=engine.threads, kv_store=connector is not None)


def build_engine(store_spec, config, store_host: str, gcs_address: str, node_store: bool):
    """One rank's engine and its store connector (None when the store cannot be reached). With
    `node_store` the KV cache is allocated in the memory of the node's store client (which must be
    running), so that client moves blocks without a copy. Returns (engine, connector)."""
    from ..cluster.kvstore.connector import make_connector, open_backend
    from ..engine.llm_engine import LLMEngine

    backend = open_backend(store_spec, store_host, gcs_address) if node_store else None
    if backend is not None:
        config = replace(config, kv_allocator=backend.allocate)
    engine = LLMEngine(config)
    connector = make_connector(store_spec, engine, local_hostname=store_host,
                               gcs_address=gcs_address, backend=backend)
    return engine, connector


@dataclass(frozen=True)
class CoreSetup:
    """What the child needs to build the worker's engine."""
    spec: dict  # the ClusterSpec, as a dict
    worker_id: str
    config: Any  # the EngineConfig, threads resolved, no kv_allocator
    store_host: str  # the address its Mooncake client advertises
    gcs_address: str
    node_store: bool
    most_threads: int = 0  # on the host's core board, stepping on up to this many (0: config.threads)


class EngineCore(EngineFront):
    """The actor's side of an engine in a child process; used as an `EngineLoop` is. Raises from
    the constructor what building the engine raised (as a RuntimeError naming it). `on_exit(reason)`
    is called from a reader thread if the child exits before `stop()`."""

    def __init__(self, setup: CoreSetup, on_exit: Callable[[str], None],
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        super().__init__()
        self._on_exit = on_exit
        self._closing = False
        ours, theirs = socket.socketpair()
        # Ray's runtime env (PYTHONPATH, the deployment's secrets, devices) reaches the child as is
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pdcluster.actors.engine_core", str(theirs.fileno())],
            pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()  # commands come from the event loop, stop() from anywhere
        try:
            self._conn.send(setup)
            if not self._conn.poll(ready_timeout_s):
                raise TimeoutError(f"the engine process did not start within {ready_timeout_s:.0f}s")
            kind, payload = self._conn.recv()
        except EOFError:  # it died before it could say why (its log has it)
            code = self._proc.wait()
            raise RuntimeError(f"the engine process exited while building the engine (code {code})") from None
        except BaseException:
            self._proc.kill()
            raise
        if kind != "ready":
            self._reap()
            raise RuntimeError(f"the engine could not be built: {payload}")
        self.facts: dict[str, Any] = payload[0]
        self._stats = payload[1]
        self._reader = threading.Thread(target=self._read, name=f"{setup.worker_id}-engine-core",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        """End the child (it finishes the step it is in) and wait for it."""
        self._closing = True
        with self._send_lock:
            # shutdown, not just close: the reader thread blocked in recv() holds the socket open,
            # and the child sees the end only once it is shut down
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(self._conn.fileno())).shutdown(socket.SHUT_RDWR)
            self._conn.close()
        self._reap()

    def _reap(self) -> None:
        """Wait for the child to leave by itself, and kill it if it does not."""
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def kill(self) -> None:
        self._closing = True
        self._proc.kill()

    def _command(self, cmd: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(cmd)
        except OSError:  # the child is gone; the reader thread reports it
            pass

    def _read(self) -> None:
        """Each step's results to the event loop, until the child's end closes."""
        while True:
            try:
                results, stats = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: the engine is lost to us
                log.exception("unreadable message from the engine process")
                self._proc.kill()
                break
            self._stats = stats
            if results:
                self._post(results)
        if self._closing:
            return
        code = self._proc.wait()
        reason = f"the engine process (pid {self._proc.pid}) exited with code {code}"
        self._on_exit(reason)  # the worker's: it exits, and its callers fail over
        self._fail(reason)


# ---------------------------------------------------------------------------- the child process

def _portable(results: list) -> list:
    """Results whose exceptions unpickle anywhere: ValueError (the request does not fit: a 400) or
    RuntimeError, with the message; a subclass with its own constructor might not rebuild."""
    out = []
    for request_id, item in results:
        if isinstance(item, BaseException) and type(item) not in (ValueError, RuntimeError):
            item = (ValueError if isinstance(item, ValueError) else RuntimeError)(str(item))
        out.append((request_id, item))
    return out


def serve(conn: Connection) -> None:
    """Build the engine, then feed it every command the worker sends until the pipe closes."""
    from ..cluster.spec import ClusterSpec

    # An engine thread that dies, or a worker that dies while the engine builds (the pipe is not
    # read then), ends this process: the worker must never wait on an engine that is gone, and the
    # engine must never outlive its worker.
    threading.excepthook = lambda args: (log.error("engine thread failed", exc_info=(
        args.exc_type, args.exc_value, args.exc_traceback)), os._exit(1))
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    setup: CoreSetup = conn.recv()
    spec = ClusterSpec.from_dict(setup.spec)
    send_lock = threading.Lock()
    built: dict[str, Any] = {}

    def build():
        built["engine"], built["connector"] = build_engine(
            spec.store, setup.config, setup.store_host, setup.gcs_address, setup.node_store)
        return built["engine"]

    def publish(results: list, stats) -> None:
        with send_lock:
            conn.send((_portable(results), stats))

    try:
        loop = EngineLoop(build, name=f"{setup.worker_id}-engine", publish=publish,
                          cores=CoreShare.open(setup.config.threads, setup.most_threads,
                                               stream_interval=spec.engine.stream_interval),
                          stream_interval=spec.engine.stream_interval)
    except BaseException as exc:
        log.exception("%s: the engine could not be built", setup.worker_id)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        os._exit(1)  # no interpreter shutdown waiting on what the failed build left running
    with send_lock:
        conn.send(("ready", (engine_facts(built["engine"], built["connector"]), loop.stats())))
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):  # the worker stopped us, or died
            os._exit(0)  # the engine thread may be mid-step: nothing of it is worth waiting for
        loop.enqueue(cmd)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s engine-core %(process)d %(name)s: %(message)s")
    # through the package, so that anything it pickles names its module, not __main__
    from pdcluster.actors.engine_core import serve as serve_engine
    fd = int(sys.argv[1])
    os.set_inheritable(fd, False)  # nothing this process starts may hold the worker's pipe open
    serve_engine(Connection(fd))
