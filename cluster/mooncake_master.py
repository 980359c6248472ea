"""Supervisor for one real `mooncake_master` process: ports, flags, readiness, health, clean shutdown.

Used directly by tests and benchmarks, and by the Ray master supervisor actor (actors/master.py).
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

BINARY = "mooncake_master"
# Any key the metadata server does not hold: it answers 404 "metadata not found", which proves it serves.
_PROBE_KEY = "pdcluster/health-probe"


class MasterStartError(RuntimeError):
    """`mooncake_master` exited during startup or did not become healthy in time (see its log)."""


@dataclass(frozen=True)
class MasterConfig:
    """How to run the master. A port of 0 means "pick a free one" (resolved once, kept across restarts)."""
    # Listeners bind here: internal only by default. Caveat: mooncake_master 0.3.13.post1 binds its HTTP
    # metadata server to 0.0.0.0 whatever --http_metadata_server_host says (seen with `ss -ltn`), so
    # keep that port closed to the outside with a firewall or network policy.
    host: str = "127.0.0.1"
    rpc_port: int = 0
    metadata_port: int = 0  # the master's built-in HTTP metadata server (no etcd)
    metrics_port: int = 0  # HTTP /metrics and /health
    kv_lease_ttl_ms: int = 10_000  # objects read or written stay pinned this long; remove() fails before
    eviction_high_watermark_ratio: float = 0.9  # evict once the pool is this full...
    eviction_ratio: float = 0.05  # ...this fraction of objects
    client_ttl_s: int = 10  # a client silent this long is dropped and its segment unmounted
    extra_args: tuple[str, ...] = ()  # passed through verbatim, e.g. ("--rpc_thread_num=8",)
    binary: str = BINARY
    log_path: str | None = None  # stdout+stderr of the master; None: a fresh temp file
    startup_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("rpc_port", "metadata_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.kv_lease_ttl_ms <= 0 or self.client_ttl_s <= 0:
            raise ValueError("kv_lease_ttl_ms and client_ttl_s must be positive")
        if not 0.0 < self.eviction_high_watermark_ratio <= 1.0 or not 0.0 < self.eviction_ratio <= 1.0:
            raise ValueError("eviction ratios must be in (0, 1]")

    def args(self) -> list[str]:
        """Command-line flags (ports must be resolved, i.e. non-zero)."""
        if 0 in (self.rpc_port, self.metadata_port, self.metrics_port):
            raise ValueError("resolve ports before building the command line")
        return [
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={self.host}",
            f"--http_metadata_server_port={self.metadata_port}",
            f"--rpc_address={self.host}",
            f"--rpc_port={self.rpc_port}",
            f"--metrics_host={self.host}",
            f"--metrics_port={self.metrics_port}",
            f"--default_kv_lease_ttl={self.kv_lease_ttl_ms}",
            f"--eviction_high_watermark_ratio={self.eviction_high_watermark_ratio}",
            f"--eviction_ratio={self.eviction_ratio}",
            f"--client_ttl={self.client_ttl_s}",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        """Environment variables on top of ours: none."""
        return {}


@dataclass(frozen=True)
class MasterHealth:
    running: bool  # the process is alive
    rpc: bool  # the RPC port accepts TCP connections
    metadata: bool  # the HTTP metadata server answers

    @property
    def ok(self) -> bool:
        return self.running and self.rpc and self.metadata


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# The master (and its metadata server) is an internal address: never route requests to it through an
# HTTP(S)_PROXY from the environment.
METADATA_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metadata_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when the HTTP metadata server at `url` (".../metadata") answers at all, 404 included."""
    try:
        with METADATA_OPENER.open(f"{url}?key={_PROBE_KEY}", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP status is an answer; 404 "metadata not found" is the expected one
    except (OSError, ValueError):
        return False


# Children get SIGKILL when this process dies, even by SIGKILL (Linux PR_SET_PDEATHSIG), so a crashed
# supervisor (a test runner, a Ray actor) never leaves a master behind holding the ports. The flag is
# set in the child just before exec, without preexec_fn (unsafe with threads, and Ray has many).
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)  # the parent died before prctl took effect\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


class _Spawner:
    """Forks children from one thread that lives as long as the process: the parent-death signal
    fires when the *thread* that forked the child exits, and callers may be short-lived threads
    (e.g. asyncio.to_thread in the supervisor actor)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._pid = -1

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        launcher = [sys.executable, "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *cmd]
        done: Future = Future()
        with self._lock:
            if self._pid != os.getpid():  # first use, or we are a forked child: threads did not survive
                self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
                threading.Thread(target=self._serve, args=(self._jobs,), name="pdcluster-spawner",
                                 daemon=True).start()
            self._jobs.put((launcher, kwargs, done))
        return done.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            cmd, kwargs, done = jobs.get()
            try:
                done.set_result(subprocess.Popen(cmd, **kwargs))
            except BaseException as e:  # hand any failure (bad binary, fd limits) to the caller
                done.set_exception(e)


_spawner = _Spawner()


def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL; always reaps the child (no zombie)."""
    if proc.poll() is not None:
        return
    if grace_s > 0:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("child pid %d ignored SIGTERM for %.1fs; killing", proc.pid, grace_s)
    proc.kill()
    proc.wait()


class SupervisedProcess:
    """One child process of `config.binary`, run with `config.args()` and `config.env()`: `start()`
    returns once `healthy()`, `stop()` reaps it. Subclasses name the program and its start error, the
    ports to pick when 0 (picked once, kept by `restart()`), the health predicate and the ready log line.
    """

    PROGRAM = ""  # for logs, errors and the temp log file's name
    StartError: type[RuntimeError] = RuntimeError
    _PORTS: dict[str, Callable[[str], int]] = {}  # config field -> picker(host) when the field is 0
    _START_ATTEMPTS = 3  # a picked port can be taken between probe and bind; retry with new ones

    def __init__(self, config) -> None:
        self._requested = config
        self.config = config  # ports resolved on start()
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._finalizer: weakref.finalize | None = None
        self.log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        raise NotImplementedError

    def _ready_message(self) -> str:
        """What the log says after "<program> pid N " once the child is healthy."""
        return "healthy"

    # -- lifecycle --
    def start(self: _S) -> _S:
        if self.running():
            return self
        binary = shutil.which(self._requested.binary)
        if binary is None:
            raise self.StartError(f"{self._requested.binary!r} not found on PATH "
                                  "(pip install mooncake-transfer-engine-non-cuda)")
        pick = any(getattr(self._requested, name) == 0 for name in self._PORTS)
        attempts = self._START_ATTEMPTS if pick else 1
        for attempt in range(1, attempts + 1):
            cfg = self._requested
            self.config = replace(cfg, **{name: getattr(cfg, name) or picker(cfg.host)
                                          for name, picker in self._PORTS.items()})
            try:
                self._spawn(binary)
                self._wait_healthy()
                return self
            except self.StartError as e:
                self.stop(grace_s=0)
                if attempt == attempts:
                    raise
                log.warning("%s start attempt %d failed (%s); retrying on new ports",
                            self.PROGRAM, attempt, e)
        raise AssertionError("unreachable")

    def restart(self: _S, grace_s: float = 5.0) -> _S:
        """Stop and start again on the same ports. What the child held in memory is lost."""
        self.stop(grace_s=grace_s)
        self._requested = self.config  # keep the resolved ports
        return self.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace_s (0: SIGKILL at once). Idempotent; reaps the process."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _terminate(self._proc, grace_s)
            log.info("%s pid %d stopped (exit %s)", self.PROGRAM, self._proc.pid, self._proc.returncode)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --
    def _spawn(self, binary: str) -> None:
        if self.config.log_path:
            self.log_path = Path(self.config.log_path)
        elif self.log_path is None:  # one temp file per supervisor, appended across restarts
            fd, name = tempfile.mkstemp(prefix=f"{self.PROGRAM}_", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        cmd = [binary, *self.config.args()]
        log.info("starting %s (log: %s)", " ".join(cmd), self.log_path)
        # Own session: a Ctrl-C aimed at the parent's terminal does not kill the child behind our back;
        # the parent-death signal still takes it down with us.
        self._proc = _spawner.popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **self.config.env()})
        # Reap the child even if stop() is never called (e.g. an exception in a test or an actor).
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 2.0)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise self.StartError(f"{self.PROGRAM} exited with {code} during startup; "
                                      f"last log lines:\n{self._log_tail()}")
            if self.healthy(timeout_s=0.5):
                log.info("%s pid %d %s", self.PROGRAM, self._proc.pid, self._ready_message())
                return
            time.sleep(0.05)
        raise self.StartError(f"{self.PROGRAM} not healthy after {self.config.startup_timeout_s}s; "
                              f"last log lines:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes()[-8192:].decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


_S = TypeVar("_S", bound=SupervisedProcess)


class MooncakeMaster(SupervisedProcess):
    """One `mooncake_master` child process. `start()` returns once it is healthy; `stop()` reaps it.

        with MooncakeMaster() as m:          # free ports on 127.0.0.1
            StoreConfig(master_server_addr=m.rpc_address, metadata_server=m.metadata_url)

    Ports picked for port=0 are kept by `restart()`, so clients can reconnect to the same address;
    the store's contents are lost (no persistence).
    """

    PROGRAM = BINARY
    StartError = MasterStartError
    _PORTS = {"rpc_port": free_port, "metadata_port": free_port, "metrics_port": free_port}

    def __init__(self, config: MasterConfig | None = None) -> None:
        super().__init__(config or MasterConfig())

    # -- addresses (valid after start) --
    @property
    def rpc_address(self) -> str:
        """`host:port` of the master RPC service: StoreConfig.master_server_addr."""
        return f"{self.config.host}:{self.config.rpc_port}"

    @property
    def metadata_url(self) -> str:
        """URL of the built-in HTTP metadata server: StoreConfig.metadata_server."""
        return f"http://{self.config.host}:{self.config.metadata_port}/metadata"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    def health(self, timeout_s: float = 1.0) -> MasterHealth:
        running = self.running()
        return MasterHealth(
            running=running,
            rpc=running and tcp_open(self.config.host, self.config.rpc_port, timeout_s),
            metadata=running and metadata_answers(self.metadata_url, timeout_s),
        )

    def healthy(self, timeout_s: float = 1.0) -> bool:
        return self.health(timeout_s).ok

    def _ready_message(self) -> str:
        return f"healthy: rpc {self.rpc_address}, metadata {self.metadata_url}"
