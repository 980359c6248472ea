"""What a worker's KV store client is: the backend interface the connector calls, its configuration
and its errors. `mooncake_client.py` is the implementation."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import torch

Protocol = Literal["tcp", "rdma", "ascend"]
ClientMode = Literal["embedded", "node"]


class KVStoreError(RuntimeError):
    """A store operation failed for a reason other than the ones below."""


class StoreUnavailable(KVStoreError):
    """The master (or metadata server) cannot be reached; nothing was transferred reliably."""


class StoreFull(KVStoreError):
    """No segment has room for the object, even after eviction."""


class BlockMissing(KVStoreError):
    """Some keys are not readable (never written, evicted, or on a segment that went away)."""

    def __init__(self, missing: Sequence[str], reasons: Sequence[str] = ()) -> None:
        self.missing = tuple(missing)
        self.reasons = tuple(reasons)
        detail = ", ".join(f"{k} ({r})" for k, r in zip(self.missing[:4], self.reasons[:4]))
        more = f" and {len(self.missing) - 4} more" if len(self.missing) > 4 else ""
        super().__init__(f"{len(self.missing)} block(s) missing from the store: {detail}{more}")


@dataclass(frozen=True)
class StoreConfig:
    """One store client. An embedded client contributes `global_segment_size` bytes to the cluster-wide
    pool; in `node` mode the node client contributes the segment and this process attaches to it."""
    master_server_addr: str  # "host:rpc_port" of mooncake_master
    metadata_server: str  # "http://host:port/metadata": the master's built-in HTTP metadata server
    # This client's address as peers see it: for tcp on one host 127.0.0.1 is enough (Mooncake adds a
    # port); for rdma/ascend it must be the node's IP on the transfer network.
    local_hostname: str = "127.0.0.1"
    protocol: Protocol = "tcp"
    device_name: str = ""  # rdma: NIC name(s), e.g. "mlx5_0" or "mlx5_0,mlx5_1"
    global_segment_size: int = 512 << 20  # 0: a pure reader that stores nothing itself
    local_buffer_size: int = 128 << 20  # Mooncake's staging buffer (used by its non-zero-copy calls)
    # Place put() objects in this client's own segment: the writer then does a local copy and the
    # reader pulls once over the network, instead of the writer pushing to a random peer's segment.
    prefer_local_segment: bool = True
    connect_timeout_s: float = 2.0  # preflight probe of master and metadata server (or node client)
    # node: attach to the node's store client at `node_client_address` ("host:port" of its RPC
    # service) over shared memory. Only memory from `MooncakeBackend.allocate` can be registered.
    client: ClientMode = "embedded"
    node_client_address: str = ""
    node_segment: str = ""  # the node client's segment ("host:transfer_port"), where puts go
    # embedded + tcp: the segment is shared memory, advertised to same-host clients, and gets copy
    # replicas out of same-host segments directly (same_host.py); the transport carries the rest.
    same_host_reads: bool = True

    def __post_init__(self) -> None:
        if self.client not in ("embedded", "node"):
            raise ValueError(f"client must be embedded or node, got {self.client!r}")
        if self.client == "node":
            host, _, port = self.node_client_address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("client 'node' needs node_client_address host:port, got "
                                 f"{self.node_client_address!r}")
        if self.protocol not in ("tcp", "rdma", "ascend"):
            raise ValueError(f"protocol must be tcp, rdma or ascend, got {self.protocol!r}")
        if self.protocol == "rdma" and not self.device_name:
            raise ValueError("protocol 'rdma' needs device_name (the RDMA NIC, e.g. mlx5_0)")
        if self.global_segment_size < 0 or self.local_buffer_size < 0:
            raise ValueError("segment and buffer sizes must be >= 0")
        host, _, port = self.master_server_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"master_server_addr must be host:port, got {self.master_server_addr!r}")
        if urlsplit(self.metadata_server).scheme != "http":
            raise ValueError(f"metadata_server must be an http:// URL, got {self.metadata_server!r}")

    @property
    def master_host_port(self) -> tuple[str, int]:
        host, _, port = self.master_server_addr.rpartition(":")
        return host, int(port)

    @property
    def node_client_host_port(self) -> tuple[str, int]:
        host, _, port = self.node_client_address.rpartition(":")
        return host, int(port)


# -- paged-cache geometry ------------------------------------------------------------------------

def block_nbytes(cache: torch.Tensor) -> int:
    """Bytes in one block of a block-major cache `[num_blocks, num_layers, block_size, *token_shape]`."""
    return cache[0].numel() * cache.element_size()


def block_spans(cache: torch.Tensor, block_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(addresses, sizes) of the given blocks: block b is the contiguous bytes of `cache[b]`."""
    if not cache.is_contiguous():
        raise ValueError("the KV cache must be one contiguous tensor (block-major)")
    nbytes, base, num_blocks = block_nbytes(cache), cache.data_ptr(), cache.shape[0]
    for b in block_ids:
        if not 0 <= b < num_blocks:
            raise IndexError(f"block id {b} out of range [0, {num_blocks})")
    return [base + b * nbytes for b in block_ids], [nbytes] * len(block_ids)


# -- the interface -------------------------------------------------------------------------------

class KVTransferBackend(ABC):
    """Moves opaque blocks between registered memory and a shared store, by key.

    Byte-level calls take raw addresses inside registered memory; the *_cache_blocks helpers turn
    (cache tensor, block ids) into those addresses. put/get are all-or-error: a failed put raises,
    a get that cannot read every key raises BlockMissing naming the keys (the others were written).
    Small values (a few bytes per key, e.g. commit records) go by put_values/get_values.
    """

    @abstractmethod
    def register_buffer(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def unregister_buffer(self, ptr: int) -> None: ...

    @abstractmethod
    def put_blocks(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> list[bool]:
        """Per key: True where this call stored it, False where the store already held the key."""

    @abstractmethod
    def get_blocks(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> None: ...

    @abstractmethod
    def put_values(self, keys: Sequence[str], values: Sequence[bytes], replace: bool = True) -> None:
        """Store small values; a key that already holds one is replaced, or with `replace` False kept."""

    @abstractmethod
    def get_values(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values stored under keys; None where a key is missing."""

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Advisory: a key can vanish right after (eviction), and a key whose holder crashed still
        shows until the master drops that client (client_ttl); only get_blocks is authoritative."""

    @abstractmethod
    def remove(self, keys: Sequence[str], force: bool = False) -> list[bool]:
        """True per key that is gone afterwards; False where a lease still pins it (unless force)."""

    @abstractmethod
    def healthy(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    def register_cache(self, cache: torch.Tensor) -> None:
        if not cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor (block-major)")
        self.register_buffer(cache.data_ptr(), cache.numel() * cache.element_size())

    def unregister_cache(self, cache: torch.Tensor) -> None:
        self.unregister_buffer(cache.data_ptr())

    def put_cache_blocks(self, cache: torch.Tensor, block_ids: Sequence[int],
                         keys: Sequence[str]) -> list[bool]:
        """Store `cache[b]` for each block id under the matching key (see put_blocks)."""
        same_length(keys, block_ids)
        return self.put_blocks(keys, *block_spans(cache, block_ids))

    def get_cache_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], keys: Sequence[str]) -> None:
        """Load each key into `cache[b]`; raises BlockMissing if any key is not readable."""
        same_length(keys, block_ids)
        self.get_blocks(keys, *block_spans(cache, block_ids))

    def __enter__(self) -> KVTransferBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def same_length(keys: Sequence[str], other: Sequence[object]) -> None:
    if len(keys) != len(other):
        raise ValueError(f"{len(keys)} keys for {len(other)} blocks")
