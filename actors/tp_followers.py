"""The follower ranks of a tensor-parallel worker: ranks 1..tp_size-1 of its engine, one child
process each on the worker's node, stepped in lockstep by the worker actor (rank 0).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

# Child processes rather than Ray actors: the worker actor already owns the node's accelerators (one
# worker per node), and a child inherits exactly what the worker has — its node, visible devices and
# runtime env (HCCL_*, ...) — with no placement or resource accounting to arrange. A pipe carries
# each iteration's commands in order at a fraction of an actor call's cost, a follower exits when that
# pipe closes (its worker is gone), and the worker sees a follower exit the moment it happens.
#
# Run as `python -m pdcluster.actors.tp_followers FD`: FD is the follower's end of the pipe.

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # loading a large checkpoint on every rank takes a while


@dataclass(frozen=True)
class FollowerSetup:
    """What a follower needs to build its rank of the worker's engine."""
    spec: dict
    worker_id: str
    tp_rank: int
    threads: int
    store_host: str  # the address its Mooncake client advertises
    gcs_address: str


class TPFollowers:
    """Starts ranks 1..tp_size-1 for the worker whose engine is rank 0 and forwards its iterations
    (the `Mirror` of `EngineLoop`). The worker's engine must join the process group (MASTER_ADDR /
    MASTER_PORT from `env`) while the followers do: construct this first, then the engine, then
    `wait_ready()`. `on_exit(reason)` is called from a watcher thread if a follower exits before
    `kill()`."""

    def __init__(self, spec: dict, worker_id: str, tp_size: int, threads: int, store_host: str,
                 gcs_address: str, on_exit: Callable[[str], None]) -> None:
        from ..cluster.supervised_process import free_port

        self.env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        self._on_exit = on_exit
        self._closing = False
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        env = {**os.environ, **self.env}  # Ray's runtime env (PYTHONPATH, HCCL_*, devices) included
        for rank in range(1, tp_size):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "pdcluster.actors.tp_followers", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env)
            theirs.close()
            conn = Connection(ours.detach())
            conn.send(FollowerSetup(spec, worker_id, rank, threads, store_host, gcs_address))
            self._conns.append(conn)
            self._procs.append(proc)
            threading.Thread(target=self._watch, args=(rank, proc), daemon=True,
                             name=f"{worker_id}-tp{rank}-watch").start()

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._procs)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> list[bool]:
        """Wait for every follower's engine; returns whether each reached the KV store."""
        connected = []
        for rank, conn in enumerate(self._conns, start=1):
            if not conn.poll(timeout_s):
                raise TimeoutError(f"TP rank {rank} did not start within {timeout_s:.0f}s")
            connected.append(bool(conn.recv()))
        return connected

    def apply(self, commands: list[tuple], step: bool) -> None:
        for conn in self._conns:
            conn.send((commands, step))

    def kill(self) -> None:
        """Stop the followers now (they also exit by themselves when this process ends)."""
        self._closing = True
        for proc in self._procs:
            proc.kill()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing:
            self._on_exit(f"TP rank {rank} (pid {proc.pid}) exited with code {code}")


# ---------------------------------------------------------------------------- the follower process

def apply_command(engine, cmd: tuple) -> None:
    """One EngineLoop command, as rank 0 applied it (a request it refused or failed to add is
    refused or fails here too, the same way, so the ranks' schedulers stay identical)."""
    if cmd[0] == "add":
        _, request_id, ids, params, kwargs = cmd
        try:
            engine.add_request(request_id, prompt_token_ids=ids, params=params, **kwargs)
        except ValueError:
            pass
        except Exception:
            log.exception("add_request(%s) failed", request_id)
    else:
        engine.abort_request(cmd[1])


def serve(conn: Connection) -> None:
    """Build this rank's engine and store client, then apply every iteration the worker sends
    until the pipe closes. Any exception ends the process: the worker then fails as a whole."""
    from ..cluster.kvstore.connector import deployment_id
    from ..cluster.spec import ClusterSpec
    from .engine_core import build_engine

    setup: FollowerSetup = conn.recv()
    spec = ClusterSpec.from_dict(setup.spec)
    config = replace(spec.engine_config(tp_rank=setup.tp_rank, deployment_id=deployment_id()),
                     threads=setup.threads)
    # as rank 0 does: in node mode the cache lives in the node client's memory; the engine joins
    # the worker's TP group
    engine, connector = build_engine(spec.store, config, setup.store_host, setup.gcs_address,
                                     node_store=spec.store.client == "node")
    conn.send(connector is not None)
    log.info("%s TP rank %d ready", setup.worker_id, setup.tp_rank)
    while True:
        try:
            commands, step = conn.recv()
        except EOFError:  # the worker closed us or died
            return
        for cmd in commands:
            apply_command(engine, cmd)
        if step:
            engine.step()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s tp-follower %(process)d %(name)s: %(message)s")
    serve(Connection(int(sys.argv[1])))
