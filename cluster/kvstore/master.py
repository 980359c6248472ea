"""Supervisor for one real `mooncake_master` process: ports, flags, readiness, health, clean shutdown.

Used directly by tests and benchmarks, and by the Ray master supervisor actor
(actors/master_supervisor.py).
"""
from __future__ import annotations

import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..supervised_process import SupervisedProcess, free_port, tcp_open

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
    _OWNED_PORTS = ("rpc_port", "metadata_port", "metrics_port")

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
