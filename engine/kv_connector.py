"""The engine's only view of a KV store: copy whole cache blocks to and from it by key.

The Mooncake implementation lives in the control plane (`cluster/kvstore/connector.py`); tests use
in-memory ones.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

_thread_role = threading.local()


def mark_transfer_thread() -> None:
    """Called on each KV transfer thread (`kv_transfers.py`) as it starts."""
    _thread_role.transfer = True


def on_transfer_thread() -> bool:
    """Whether the caller is a KV transfer thread: the engine keeps stepping on its own cores
    meanwhile, so a connector copies on this one thread rather than fanning a copy out over the
    cores the step is using (measured on 2 cores: a load's parallel copy slowed the concurrent decode
    step more than it sped up the load)."""
    return getattr(_thread_role, "transfer", False)


class KVConnector(ABC):
    """Moves whole cache blocks between this engine's KV memory and a shared store.

    A block is found by later requests (the cluster-wide prefix cache) only through its commit
    record: its checksum, stored once the block's bytes are complete. Loads through `committed`
    are checked against it like a handoff's are against the manifest, so no block is trusted on
    its key alone."""

    @abstractmethod
    def save(self, keys: list[str], block_ids: list[int], checksums: list[int | None]) -> list[bool]:
        """Write blocks `block_ids` of the cache under `keys`, then commit each block this call
        stored with its checksum (None: never looked up as a prefix, no record); per-block success."""

    @abstractmethod
    def load(self, keys: list[str], block_ids: list[int]) -> list[bool]:
        """Read `keys` into cache blocks `block_ids`; per-block success (False: missing/failed)."""

    @abstractmethod
    def commit(self, keys: list[str], checksums: list[int]) -> None:
        """Record checksums of stored blocks a load has just verified, where no record exists yet: a
        block whose record was lost (evicted, or its writer died first) is found again."""

    @abstractmethod
    def committed(self, keys: list[str]) -> list[int | None]:
        """The checksum each key was committed with; None where there is no commit record (never
        completely written, or evicted). Advisory: a block can still vanish before it is loaded."""
