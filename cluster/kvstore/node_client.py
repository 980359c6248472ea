"""Supervisor for a node's one real Mooncake store client (`mooncake_client`): ports, flags,
readiness, health, clean shutdown.
"""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass

# the same child handling as the master: parent-death signal, SIGTERM-then-SIGKILL, reaping
from ..supervised_process import SupervisedProcess, free_port, tcp_open
from .backend import Protocol

# In the store's `node` mode this process owns the node's segment and does every copy; the workers on
# the node attach to it over shared memory (`StoreConfig.client == "node"`). Used by tests and
# benchmarks, and by the per-node supervisor actor (actors/node_client.py).

BINARY = "mooncake_client"
# mooncake_client takes its transfer engine's port from MC_STORE_CLIENT_MIN/MAX_PORT only inside these
# ranges; anything else it silently replaces with a random port in 12300-14300.
TRANSFER_PORT_RANGES = ((1024, 32767), (61000, 65535))


def valid_transfer_port(port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in TRANSFER_PORT_RANGES)


def free_transfer_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port that was free a moment ago, in a range mooncake_client accepts (above its own
    default 12300-14300, below the usual ephemeral range)."""
    for _ in range(attempts):
        port = random.randint(20000, 32767)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free transfer port on {host} in 20000-32767")


class NodeClientStartError(RuntimeError):
    """`mooncake_client` exited during startup or did not become healthy in time (see its log)."""


@dataclass(frozen=True)
class NodeClientConfig:
    """How to run a node client. A port of 0 means "pick a free one" (resolved once, kept across
    restarts)."""
    master_server_addr: str  # "host:rpc_port" of mooncake_master
    metadata_server: str  # "http://host:port/metadata"
    # The node's address as peers see it: the segment is named host:transfer_port, and the RPC
    # service that workers attach to listens here.
    host: str = "127.0.0.1"
    port: int = 0  # RPC service (plus the abstract unix socket @mooncake_client_<port>.sock)
    transfer_port: int = 0  # the transfer engine's port, pinned so the segment's name is known up front
    protocol: Protocol = "tcp"
    device_name: str = ""  # rdma: NIC name(s)
    global_segment_size: int = 512 << 20  # what the node contributes to the store
    binary: str = BINARY
    log_path: str | None = None  # stdout+stderr of the client; None: a fresh temp file
    startup_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.transfer_port and not valid_transfer_port(self.transfer_port):
            raise ValueError(f"transfer_port must be in 1024-32767 or 61000-65535 (mooncake_client "
                             f"ignores others), got {self.transfer_port}")
        if self.global_segment_size <= 0:
            raise ValueError("global_segment_size must be positive")

    @property
    def segment_name(self) -> str:
        return f"{self.host}:{self.transfer_port}"

    def args(self) -> list[str]:
        if 0 in (self.port, self.transfer_port):
            raise ValueError("resolve ports before building the command line")
        return [
            f"--host={self.host}",
            f"--port={self.port}",
            f"--master_server_address={self.master_server_addr}",
            f"--metadata_server={self.metadata_server}",
            f"--global_segment_size={self.global_segment_size}",
            f"--protocol={self.protocol}",
            f"--device_names={self.device_name}",
            "--local_buffer_size=0",  # attached workers bring their own buffers
        ]

    def env(self) -> dict[str, str]:
        # mooncake_client takes its transfer engine's port from this range (default: a random one)
        port = str(self.transfer_port)
        return {"MC_STORE_CLIENT_MIN_PORT": port, "MC_STORE_CLIENT_MAX_PORT": port}


class MooncakeNodeClient(SupervisedProcess):
    """One `mooncake_client` child process. `start()` returns once it accepts workers; `stop()` reaps it.

        with MooncakeNodeClient(NodeClientConfig(master.rpc_address, master.metadata_url)) as node:
            StoreConfig(..., client="node", node_client_address=node.rpc_address,
                        node_segment=node.segment_name)

    `restart()` keeps the ports, so the segment keeps its name; its contents are lost.
    """

    PROGRAM = BINARY
    StartError = NodeClientStartError
    _PORTS = {"port": free_port, "transfer_port": free_transfer_port}
    _OWNED_PORTS = ("port",)

    def __init__(self, config: NodeClientConfig) -> None:
        super().__init__(config)

    @property
    def rpc_address(self) -> str:
        """`host:port` workers attach to: StoreConfig.node_client_address."""
        return f"{self.config.host}:{self.config.port}"

    @property
    def segment_name(self) -> str:
        """The node's segment: StoreConfig.node_segment."""
        return self.config.segment_name

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """Running and its RPC service accepts connections (it starts listening last)."""
        return self.running() and tcp_open(self.config.host, self.config.port, timeout_s)

    def _ready_message(self) -> str:
        return (f"ready at {self.rpc_address} (segment {self.segment_name}, "
                f"{self.config.global_segment_size >> 20} MiB)")
