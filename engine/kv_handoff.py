"""The KV handoff record: what prefill exports and decode imports (layout, prompt, block keys, CRCs).

A block that is missing, evicted or fails its checksum is recomputed by the importing engine, never
trusted; `cluster/kvstore/manifest.py` turns this record into the versioned kv.proto manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zlib_ng import zlib_ng

if TYPE_CHECKING:   # torch is not imported at runtime: worker actors read handoffs without it
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
    num_mtp_layers: int = 0        # of num_layers, the last ones: MTP layers' KV (speculative decoding)


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


def block_checksum(block: torch.Tensor, num_tokens: int | None = None) -> int:
    """CRC-32 of one block (`cache[b]`: [num_layers, block_size, *token_shape]) over its first
    `num_tokens` token slots of every layer (all when None), so a partial block's stale tail does
    not count. zlib's CRC-32 (zlib-ng's build of it: the same checksum, 4-5x the speed of the stdlib's),
    and accidental corruption is all it must catch."""
    import torch
    if block.dim() < 3:
        raise ValueError(f"expected one block [num_layers, block_size, ...], got {tuple(block.shape)}")
    whole = num_tokens is None or num_tokens == block.shape[1]
    part = (block if whole else block[:, :num_tokens]).detach()
    if part.device.type == "cpu" and block.is_contiguous() and not whole:
        # layer by layer, each layer's slots being contiguous: no copy, so no torch op runs here (a
        # transfer thread calls this, and an op there would open OpenMP regions off the engine's
        # thread; see actors/engine_loop.py). The CRC of the layers in turn is the CRC of their bytes.
        crc = 0
        for layer in part:
            crc = zlib_ng.crc32(memoryview(layer.view(torch.uint8).numpy()), crc)
        return crc
    host = part.to("cpu").contiguous()
    return zlib_ng.crc32(memoryview(host.view(torch.uint8).numpy()))


def store_key(block_hash: bytes) -> str:
    return "pdkv/" + block_hash.hex()
