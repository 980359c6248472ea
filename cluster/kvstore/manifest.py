"""The KV handoff on the wire: build, check and (de)serialize `pdcluster.kv.v1` manifests (kv.proto).

A prefill worker sends `encode_handoff(...)` bytes; a decode worker reads them with `decode_handoff`,
which refuses another version or an inconsistent manifest with a `ManifestError` naming what is wrong.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from zlib_ng import zlib_ng

from ...engine.kv_handoff import BlockRef, KVHandoff, KVLayout
from ...engine.kv_handoff import block_checksum as engine_block_checksum
from ...proto import kv_pb2
from .backend import block_nbytes

if TYPE_CHECKING:   # not imported at runtime: worker actors decode handoffs without torch
    import torch

MANIFEST_VERSION = 1
KINDS = ("mha", "mla")

# Why CRC-32: it guards against transport/eviction bugs, not adversaries (keys are sha256 chain
# hashes already). zlib-ng computes zlib's CRC-32 bit for bit with carry-less multiplies, releasing
# the GIL: ~5x the stdlib's zlib on a prompt's blocks (`cluster/tools/bench_checksum.py`), which in
# turn is ~5x hashlib.blake2b(digest_size=8).
CHECKSUM_ALGO = kv_pb2.CHECKSUM_ALGO_CRC32


class ManifestError(ValueError):
    """The manifest is malformed, of another version, or does not fit the reader's cache/model."""


def block_checksum(data: torch.Tensor | memoryview | bytes | bytearray, num_tokens: int | None = None) -> int:
    """CRC-32 of one block: a tensor `cache[b]` over its first `num_tokens` token slots (the engine's
    own checksum), or bytes-like data whole (num_tokens must be None)."""
    if hasattr(data, "dim"):   # a block tensor (torch is not imported here)
        return engine_block_checksum(data, num_tokens)
    if num_tokens is not None:
        raise ValueError("num_tokens applies to a block tensor, not to raw bytes")
    return zlib_ng.crc32(data)


def layout_of(cache: torch.Tensor, kind: str, num_mtp_layers: int = 0) -> kv_pb2.KVLayout:
    """Layout of a block-major cache `[num_blocks, num_layers, block_size, *token_shape]` whose last
    `num_mtp_layers` layers are MTP layers."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    token_shape = tuple(cache.shape[3:])
    if kind == "mha" and (len(token_shape) != 3 or token_shape[0] != 2):
        raise ValueError(f"mha token_shape must be (2, num_kv_heads, head_dim), got {token_shape}")
    if kind == "mla" and len(token_shape) != 1:
        raise ValueError(f"mla token_shape must be (kv_lora_rank + qk_rope_head_dim,), got {token_shape}")
    return kv_pb2.KVLayout(kind=kind, num_layers=cache.shape[1], dtype=str(cache.dtype).removeprefix("torch."),
                           token_shape=token_shape, block_nbytes=block_nbytes(cache),
                           num_mtp_layers=num_mtp_layers)


def build_manifest(*, request_id: str, model_fingerprint: str, cache: torch.Tensor, kind: str,
                   block_ids: Sequence[int], keys: Sequence[str], token_ids: Sequence[int],
                   first_token: int, num_computed_tokens: int | None = None, num_cached_tokens: int = 0,
                   tp_rank: int = 0, tp_size: int = 1, checksums: bool = True) -> kv_pb2.KVManifest:
    """Describe the prompt KV held in `cache[block_ids]` (stored under `keys`) for a decode worker.

    Block i holds tokens [i*block_size, (i+1)*block_size) of the first `num_computed_tokens` prompt
    tokens (default: all of them); the last block may be partial. With checksums=False the blocks
    carry no checksum and the reader cannot detect corruption (CHECKSUM_ALGO_NONE).
    """
    block_size = cache.shape[2]
    n = len(token_ids) if num_computed_tokens is None else num_computed_tokens
    if len(keys) != len(block_ids):
        raise ValueError(f"{len(keys)} keys for {len(block_ids)} blocks")
    if len(block_ids) != -(-n // block_size):
        raise ValueError(f"{n} tokens need {-(-n // block_size)} blocks of {block_size}, got {len(block_ids)}")
    blocks = []
    for i, (b, key) in enumerate(zip(block_ids, keys)):
        num = min(block_size, n - i * block_size)
        blocks.append(kv_pb2.BlockRef(key=key, num_tokens=num,
                                      checksum=block_checksum(cache[b], num) if checksums else 0))
    manifest = kv_pb2.KVManifest(
        version=MANIFEST_VERSION, request_id=request_id, model_fingerprint=model_fingerprint,
        block_size=block_size, tp_rank=tp_rank, tp_size=tp_size, layout=layout_of(cache, kind),
        blocks=blocks, token_ids=token_ids, first_token=first_token, num_computed_tokens=n,
        num_cached_tokens=num_cached_tokens,
        checksum_algo=CHECKSUM_ALGO if checksums else kv_pb2.CHECKSUM_ALGO_NONE)
    validate(manifest)
    return manifest


def validate(m: kv_pb2.KVManifest) -> None:
    """Raise ManifestError unless `m` is a self-consistent v1 manifest."""
    if m.version != MANIFEST_VERSION:
        raise ManifestError(f"manifest version {m.version}, this reader understands {MANIFEST_VERSION}")
    if m.checksum_algo not in (kv_pb2.CHECKSUM_ALGO_NONE, kv_pb2.CHECKSUM_ALGO_CRC32):
        raise ManifestError(f"unknown checksum algorithm {m.checksum_algo}")
    if not m.HasField("layout") or m.layout.kind not in KINDS or m.layout.block_nbytes == 0:
        raise ManifestError("manifest has no valid layout")
    if m.block_size == 0 or not m.tp_rank < m.tp_size:
        raise ManifestError(f"bad block_size {m.block_size} or tp_rank {m.tp_rank}/{m.tp_size}")
    if m.num_computed_tokens > len(m.token_ids) or m.num_cached_tokens > m.num_computed_tokens:
        raise ManifestError(f"{m.num_computed_tokens} computed / {m.num_cached_tokens} cached tokens "
                            f"for a {len(m.token_ids)}-token prompt")
    expect = m.num_computed_tokens
    for i, b in enumerate(m.blocks):
        want = min(m.block_size, expect - i * m.block_size)
        if not b.key or b.num_tokens != want:
            raise ManifestError(f"block {i}: key {b.key!r} with {b.num_tokens} tokens, expected {want}")
    if len(m.blocks) != -(-expect // m.block_size):
        raise ManifestError(f"{len(m.blocks)} blocks for {expect} tokens of block size {m.block_size}")


def check_compatible(m: kv_pb2.KVManifest, cache: torch.Tensor, kind: str, model_fingerprint: str,
                     tp_rank: int, tp_size: int, num_mtp_layers: int = 0) -> None:
    """Raise ManifestError unless the manifest's blocks can be copied byte-for-byte into `cache`."""
    if m.model_fingerprint != model_fingerprint:
        raise ManifestError(f"model {m.model_fingerprint!r}, this worker serves {model_fingerprint!r}")
    if (m.tp_rank, m.tp_size) != (tp_rank, tp_size):
        raise ManifestError(f"TP rank {m.tp_rank}/{m.tp_size}, this worker is {tp_rank}/{tp_size}")
    if m.block_size != cache.shape[2]:
        raise ManifestError(f"block size {m.block_size}, this cache has {cache.shape[2]}")
    ours = layout_of(cache, kind, num_mtp_layers)
    if m.layout != ours:
        raise ManifestError(f"layout {_short(m.layout)} does not match this cache's {_short(ours)}")


def verify_block(m: kv_pb2.KVManifest, index: int, block: torch.Tensor) -> bool:
    """True if `block` (= cache[b] after loading manifest block `index`) matches its checksum.

    Always True for CHECKSUM_ALGO_NONE manifests (nothing to check)."""
    if m.checksum_algo == kv_pb2.CHECKSUM_ALGO_NONE:
        return True
    ref = m.blocks[index]
    return block_checksum(block, ref.num_tokens) == ref.checksum


def verify_blocks(m: kv_pb2.KVManifest, cache: torch.Tensor, block_ids: Sequence[int]) -> list[bool]:
    """verify_block for every manifest block, loaded into `cache[block_ids[i]]`."""
    if len(block_ids) != len(m.blocks):
        raise ValueError(f"{len(block_ids)} block ids for {len(m.blocks)} manifest blocks")
    return [verify_block(m, i, cache[b]) for i, b in enumerate(block_ids)]


def handoff_to_manifest(h: KVHandoff, tp_rank: int = 0, tp_size: int = 1) -> kv_pb2.KVManifest:
    """The engine's KVHandoff (prefill export) as a wire manifest. Its blocks cover the prompt from
    token 0 (a prefix of it when a store write failed); engine checksums are CRC-32. A TP handoff
    carries every rank's blocks: this is rank `tp_rank`'s manifest."""
    lay = h.layout
    blocks = h.blocks_of_rank(tp_rank)
    m = kv_pb2.KVManifest(
        version=MANIFEST_VERSION, request_id=h.request_id, model_fingerprint=h.model_fingerprint,
        block_size=lay.block_size, tp_rank=tp_rank, tp_size=tp_size,
        layout=kv_pb2.KVLayout(kind=lay.kind, num_layers=lay.num_layers, dtype=lay.dtype,
                               token_shape=lay.token_shape, block_nbytes=lay.block_nbytes,
                               num_mtp_layers=lay.num_mtp_layers),
        blocks=[kv_pb2.BlockRef(key=b.key, num_tokens=b.num_tokens, checksum=b.checksum) for b in blocks],
        token_ids=h.token_ids, first_token=h.first_token,
        num_computed_tokens=sum(b.num_tokens for b in blocks),
        # informational; clamped so an export cut short by a failed store write still validates
        num_cached_tokens=min(h.num_cached_tokens, sum(b.num_tokens for b in blocks)),
        checksum_algo=CHECKSUM_ALGO)
    validate(m)
    return m


def manifest_to_handoff(m: kv_pb2.KVManifest) -> KVHandoff:
    """A validated wire manifest as the engine's KVHandoff (decode import). The engine verifies every
    block, so a manifest without checksums is refused rather than turned into certain recomputes."""
    validate(m)
    if m.checksum_algo != CHECKSUM_ALGO:
        raise ManifestError("the engine verifies every block: the manifest must carry CRC-32 checksums")
    lay = m.layout
    return KVHandoff(
        request_id=m.request_id, model_fingerprint=m.model_fingerprint,
        layout=KVLayout(kind=lay.kind, num_layers=lay.num_layers, block_size=m.block_size,
                        token_shape=tuple(lay.token_shape), dtype=lay.dtype, block_nbytes=lay.block_nbytes,
                        num_mtp_layers=lay.num_mtp_layers),
        token_ids=tuple(m.token_ids), first_token=m.first_token,
        blocks=tuple(BlockRef(b.key, b.num_tokens, b.checksum) for b in m.blocks),
        num_cached_tokens=m.num_cached_tokens)


def encode_handoff(h: KVHandoff) -> bytes:
    """The engine's handoff as `kv.proto` bytes: one manifest per TP rank, rank 0 first."""
    ranks = [handoff_to_manifest(h, r, h.tp_size) for r in range(h.tp_size)]
    return kv_pb2.KVHandoff(ranks=ranks).SerializeToString()


def decode_handoff(data: bytes) -> KVHandoff:
    """`encode_handoff`'s bytes back as the engine's handoff; raises ManifestError on garbage, another
    manifest version, or ranks that do not belong together."""
    wire = kv_pb2.KVHandoff()
    try:
        wire.ParseFromString(data)
    except DecodeError as e:
        raise ManifestError(f"not a KV handoff: {e}") from e
    if not wire.ranks:
        raise ManifestError("the KV handoff has no manifest")
    for r, m in enumerate(wire.ranks):
        validate(m)
        if (m.tp_rank, m.tp_size) != (r, len(wire.ranks)):
            raise ManifestError(f"manifest {r} is for TP rank {m.tp_rank}/{m.tp_size}, expected "
                                f"{r}/{len(wire.ranks)}")
    first, *followers = (manifest_to_handoff(m) for m in wire.ranks)
    for f in followers:
        if (f.request_id, f.token_ids, f.first_token) != (first.request_id, first.token_ids,
                                                          first.first_token):
            raise ManifestError("the TP ranks' manifests describe different requests")
    return replace(first, follower_blocks=tuple(f.blocks for f in followers))


def to_bytes(m: kv_pb2.KVManifest) -> bytes:
    validate(m)
    return m.SerializeToString()


def from_bytes(data: bytes) -> kv_pb2.KVManifest:
    """Parse and validate; raises ManifestError on garbage, another version, or inconsistency."""
    m = kv_pb2.KVManifest()
    try:
        m.ParseFromString(data)
    except DecodeError as e:
        raise ManifestError(f"not a KVManifest: {e}") from e
    validate(m)
    return m


def _short(layout: kv_pb2.KVLayout) -> str:
    return (f"{layout.kind} {layout.num_layers}L {layout.dtype} {tuple(layout.token_shape)} "
            f"{layout.block_nbytes}B")
