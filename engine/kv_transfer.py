"""KV handoff between engines: what prefill exports, what decode imports, and the connector interface.

The engine only knows `KVConnector` (copy whole blocks of its cache to/from a store by key); the
Mooncake implementation lives in the control plane (`pdcluster.cluster.kv_connector`). A block that
is missing, evicted or fails its checksum is recomputed by the importing engine, never trusted.
"""
from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KVLayout:
    """How one block of the cache is laid out: [num_layers, block_size, *token_shape] of dtype."""
    kind: str                      # "mha" (K and V per kv-head) or "mla" (compressed latent + rope)
    num_layers: int
    block_size: int
    token_shape: tuple[int, ...]
    dtype: str
    block_nbytes: int


@dataclass(frozen=True)
class BlockRef:
    key: str
    num_tokens: int
    checksum: int


@dataclass(frozen=True)
class KVHandoff:
    """The manifest prefill gives decode: the prompt, its first token and where its KV blocks are."""
    request_id: str
    model_fingerprint: str
    layout: KVLayout
    token_ids: tuple[int, ...]
    first_token: int
    blocks: tuple[BlockRef, ...] = ()            # TP rank 0's (the only rank without TP)
    num_cached_tokens: int = 0                   # prompt tokens prefill took from a prefix cache
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # A TP engine's ranks 1..tp_size-1: each rank stores its own shard of every block under its own
    # keys (the chain hash is salted with the rank), with its own checksums.
    follower_blocks: tuple[tuple[BlockRef, ...], ...] = ()

    @property
    def tp_size(self) -> int:
        return 1 + len(self.follower_blocks)

    def blocks_of_rank(self, tp_rank: int) -> tuple[BlockRef, ...]:
        return self.blocks if tp_rank == 0 else self.follower_blocks[tp_rank - 1]


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


def block_checksum(block: torch.Tensor, num_tokens: int | None = None) -> int:
    """CRC-32 of one block (`cache[b]`: [num_layers, block_size, *token_shape]) over its first
    `num_tokens` token slots of every layer (all when None), so a partial block's stale tail does
    not count. zlib's CRC: stdlib, fast, and accidental corruption is all it must catch."""
    if block.dim() < 3:
        raise ValueError(f"expected one block [num_layers, block_size, ...], got {tuple(block.shape)}")
    part = block if num_tokens is None else block[:, :num_tokens]
    host = part.detach().to("cpu").contiguous()          # no copy for a whole CPU block
    return zlib.crc32(memoryview(host.view(torch.uint8).numpy()))


def store_key(block_hash: bytes) -> str:
    return "pdkv/" + block_hash.hex()
