"""A child process that is started, health-checked, restarted and reaped, and never outlives us.

Base of the Mooncake master and node-client supervisors; also the port helpers they and tests use.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)


# Ports only a process that names them gets: above Ray's worker ports (10002-19999), below the
# kernel's ephemeral range, which serves bind(0) and every outgoing connection.
_NAMED_PORTS_FROM = 20000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if someone takes it first), and that no
    other process is handed by chance before the caller binds it: one from bind(0) is an ephemeral
    port, which the next outgoing connection or bind(0) of any process (Ray starts dozens) may take.
    Never the same port twice in this process."""
    low, _ = _ephemeral_range()
    for _ in range(200 if low - _NAMED_PORTS_FROM >= 1000 else 0):
        port = random.randrange(_NAMED_PORTS_FROM, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no such range here
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default (macOS starts higher)


def listening_inodes(port: int) -> set[int] | None:
    """Socket inodes in LISTEN state on `port` (IPv4 and IPv6), from /proc; None where /proc has no
    socket tables (not Linux)."""
    found: set[int] | None = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = found or set()
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (empty if its fds cannot be read)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
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


_S = TypeVar("_S", bound="SupervisedProcess")


class SupervisedProcess:
    """One child process of `config.binary`, run with `config.args()` and `config.env()`: `start()`
    returns once `healthy()`, `stop()` reaps it. Subclasses name the program and its start error, the
    ports to pick when 0 (picked once, kept by `restart()`), the health predicate and the ready log line.
    """

    PROGRAM = ""  # for logs, errors and the temp log file's name
    StartError: type[RuntimeError] = RuntimeError
    _PORTS: dict[str, Callable[[str], int]] = {}  # config field -> picker(host) when the field is 0
    _START_ATTEMPTS = 3  # a picked port can be taken between probe and bind; retry with new ones
    # Config fields naming ports the child must itself listen on once healthy. mooncake_master keeps
    # running when a port is taken (it logs "started" and serves nothing there), and a health probe
    # would then talk to whoever holds the port: the owner of each listening socket is checked.
    _OWNED_PORTS: tuple[str, ...] = ()

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
            if self.healthy(timeout_s=0.5) and self._ports_owned():
                log.info("%s pid %d %s", self.PROGRAM, self._proc.pid, self._ready_message())
                return
            time.sleep(0.05)
        raise self.StartError(f"{self.PROGRAM} not healthy after {self.config.startup_timeout_s}s; "
                              f"last log lines:\n{self._log_tail()}")

    def _ports_owned(self) -> bool:
        """True once the child listens on each of `_OWNED_PORTS`; StartError when another process
        holds one (the child will never get it)."""
        mine = socket_inodes(self._proc.pid)
        for name in self._OWNED_PORTS:
            port = getattr(self.config, name)
            listening = listening_inodes(port)
            if listening is None:
                return True  # no /proc to ask: trust the health probe
            if listening & mine:
                continue
            if listening:
                raise self.StartError(f"{self.PROGRAM} could not listen on {name} {port}: another "
                                      "process holds it")
            return False  # not listening yet
        return True

    def _log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes()[-8192:].decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
