"""KV handoff manifest: checksums of valid token slots, block accounting, (de)serialization, checks."""
from __future__ import annotations

import zlib

import pytest
import torch

from pdcluster.cluster.kvstore import manifest as km
from pdcluster.engine import kv_handoff as kt
from pdcluster.proto import kv_pb2

BS = 16  # tokens per block


def _mha_cache(num_blocks: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    # [num_blocks, num_layers, block_size, 2 (K, V), num_kv_heads, head_dim]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, 3, BS, 2, 2, 8, generator=g).to(dtype)


def _build(cache: torch.Tensor, n_tokens: int = 35, block_ids=(5, 1, 6), **kw) -> kv_pb2.KVManifest:
    args = dict(request_id="req-1", model_fingerprint="smollm2-135m/fp32", cache=cache, kind="mha",
                block_ids=list(block_ids), keys=[f"k{i}" for i in range(len(block_ids))],
                token_ids=list(range(100, 100 + n_tokens)), first_token=42)
    return km.build_manifest(**(args | kw))


def test_checksum_covers_valid_slots_of_every_layer_only() -> None:
    cache = _mha_cache()
    block = cache[2]
    whole = km.block_checksum(block)
    assert whole == zlib.crc32(block.numpy().tobytes())
    assert whole == km.block_checksum(memoryview(block.numpy()).cast("B"))

    partial = km.block_checksum(block, 5)
    block[:, 5:] = 0  # the stale tail of a partial block does not count
    assert km.block_checksum(block, 5) == partial
    block[2, 4, 1, 1, 7] += 1  # a valid slot in the last layer does
    assert km.block_checksum(block, 5) != partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, BS - 1, BS])
def test_partial_checksum_is_the_crc_of_the_valid_slots_bytes_layer_after_layer(dtype, num_tokens) -> None:
    # computed layer by layer without a copy; a reader on another engine checks it against the bytes
    block = _mha_cache(dtype=dtype)[3]
    valid = block[:, :num_tokens].contiguous().view(torch.uint8).numpy().tobytes()
    assert km.block_checksum(block, num_tokens) == zlib.crc32(valid)
    mla = torch.randn(4, 3, BS, 24).to(dtype)[1]  # [num_layers, block_size, latent]
    assert km.block_checksum(mla, num_tokens) == zlib.crc32(mla[:, :num_tokens].contiguous().view(torch.uint8).numpy().tobytes())


def test_checksum_of_bfloat16_and_single_bit_flip() -> None:
    block = _mha_cache(dtype=torch.bfloat16)[0]
    before = km.block_checksum(block)
    raw = block.view(torch.int16)
    raw[1, 3, 0, 1, 2] ^= 1
    assert km.block_checksum(block) != before


def test_build_manifest_accounts_blocks_and_layout() -> None:
    cache = _mha_cache()
    m = _build(cache)
    assert [b.num_tokens for b in m.blocks] == [16, 16, 3]
    assert [b.key for b in m.blocks] == ["k0", "k1", "k2"]
    assert m.blocks[2].checksum == km.block_checksum(cache[6], 3)
    assert m.layout.kind == "mha" and m.layout.num_layers == 3 and m.layout.dtype == "float32"
    assert list(m.layout.token_shape) == [2, 2, 8]
    assert m.layout.block_nbytes == 3 * BS * 2 * 2 * 8 * 4
    assert (m.version, m.block_size, m.num_computed_tokens, m.first_token) == (1, BS, 35, 42)
    assert m.checksum_algo == kv_pb2.CHECKSUM_ALGO_CRC32
    with pytest.raises(ValueError, match="need 3 blocks"):
        _build(cache, block_ids=(5, 1))
    with pytest.raises(ValueError, match="keys"):
        km.build_manifest(request_id="r", model_fingerprint="f", cache=cache, kind="mha", block_ids=[1],
                          keys=["a", "b"], token_ids=[1, 2], first_token=0)


def test_mla_layout_and_shape_checks() -> None:
    latent = torch.zeros(4, 2, BS, 512 + 64, dtype=torch.bfloat16)  # kv_lora_rank + qk_rope_head_dim
    lay = km.layout_of(latent, "mla")
    assert (lay.kind, list(lay.token_shape), lay.dtype, lay.block_nbytes) == ("mla", [576], "bfloat16",
                                                                              2 * BS * 576 * 2)
    with pytest.raises(ValueError):
        km.layout_of(latent, "mha")
    with pytest.raises(ValueError):
        km.layout_of(_mha_cache(), "mla")
    with pytest.raises(ValueError):
        km.layout_of(latent, "gqa")


def test_verify_after_copy_into_other_blocks_and_detect_corruption() -> None:
    src = _mha_cache(seed=1)
    m = km.from_bytes(km.to_bytes(_build(src)))
    dst = _mha_cache(seed=2)  # the decode side's cache, different contents elsewhere
    dst[[0, 3, 7]] = src[[5, 1, 6]]
    assert km.verify_blocks(m, dst, [0, 3, 7]) == [True, True, True]
    dst[7, :, 3:] = -1.0  # beyond the 3 valid tokens of the last block
    assert km.verify_blocks(m, dst, [0, 3, 7]) == [True, True, True]
    dst[3, 0, 15, 1, 0, 0] = 123.0
    assert km.verify_blocks(m, dst, [0, 3, 7]) == [True, False, True]
    with pytest.raises(ValueError):
        km.verify_blocks(m, dst, [0, 3])


def test_without_checksums_nothing_is_verified() -> None:
    cache = _mha_cache()
    m = _build(cache, checksums=False)
    assert m.checksum_algo == kv_pb2.CHECKSUM_ALGO_NONE
    assert all(b.checksum == 0 for b in m.blocks)
    cache.zero_()
    assert km.verify_blocks(m, cache, [5, 1, 6]) == [True, True, True]


def test_roundtrip_and_rejects_bad_manifests() -> None:
    m = _build(_mha_cache(), num_cached_tokens=16)
    again = km.from_bytes(km.to_bytes(m))
    assert again == m and list(again.token_ids) == list(range(100, 135))

    with pytest.raises(km.ManifestError):
        km.from_bytes(b"\xff\xff\xff garbage")
    for field, value in [("version", 2), ("checksum_algo", kv_pb2.CHECKSUM_ALGO_UNSPECIFIED),
                         ("tp_size", 0), ("num_computed_tokens", 200), ("num_cached_tokens", 36)]:
        bad = kv_pb2.KVManifest()
        bad.CopyFrom(m)
        setattr(bad, field, value)
        with pytest.raises(km.ManifestError):
            km.from_bytes(bad.SerializeToString())
    short = kv_pb2.KVManifest()
    short.CopyFrom(m)
    del short.blocks[-1]
    with pytest.raises(km.ManifestError):
        km.from_bytes(short.SerializeToString())
    wrong_count = kv_pb2.KVManifest()
    wrong_count.CopyFrom(m)
    wrong_count.blocks[1].num_tokens = 15
    with pytest.raises(km.ManifestError):
        km.to_bytes(wrong_count)


def test_check_compatible_rejects_other_model_rank_and_layout() -> None:
    cache = _mha_cache()
    m = _build(cache, tp_rank=1, tp_size=2)
    km.check_compatible(m, torch.empty_like(cache), "mha", "smollm2-135m/fp32", tp_rank=1, tp_size=2)
    cases = [
        (cache, "mha", "other-model", 1, 2),
        (cache, "mha", "smollm2-135m/fp32", 0, 2),
        (cache.to(torch.bfloat16), "mha", "smollm2-135m/fp32", 1, 2),
        (torch.zeros(8, 3, 8, 2, 2, 8), "mha", "smollm2-135m/fp32", 1, 2),  # block size 8
        (torch.zeros(8, 4, BS, 2, 2, 8), "mha", "smollm2-135m/fp32", 1, 2),  # 4 layers
    ]
    for other, kind, fp, rank, size in cases:
        with pytest.raises(km.ManifestError):
            km.check_compatible(m, other, kind, fp, tp_rank=rank, tp_size=size)


def _engine_handoff(cache: torch.Tensor, block_ids: list[int], n_tokens: int) -> kt.KVHandoff:
    layout = kt.KVLayout(kind="mha", num_layers=cache.shape[1], block_size=BS, token_shape=(2, 2, 8),
                         dtype="float32", block_nbytes=cache[0].numel() * cache.element_size())
    sizes = [min(BS, n_tokens - i * BS) for i in range(len(block_ids))]
    refs = [kt.BlockRef(f"pdkv/{i}", n, kt.block_checksum(cache[b], n))
            for i, (b, n) in enumerate(zip(block_ids, sizes))]
    return kt.KVHandoff(request_id="r7", model_fingerprint="fp", layout=layout,
                        token_ids=tuple(range(n_tokens)), first_token=9, blocks=tuple(refs),
                        num_cached_tokens=16)


def test_engine_handoff_roundtrips_and_checksums_agree() -> None:
    cache = _mha_cache(seed=3)
    h = _engine_handoff(cache, [2, 7, 4], 40)
    m = km.from_bytes(km.to_bytes(km.handoff_to_manifest(h, tp_rank=0, tp_size=1)))
    assert (m.num_computed_tokens, m.block_size, m.checksum_algo) == (40, BS, kv_pb2.CHECKSUM_ALGO_CRC32)
    assert km.manifest_to_handoff(m) == h
    # the engine's checksum and this module's are the same function of the block
    assert km.verify_blocks(m, cache, [2, 7, 4]) == [True, True, True]
    km.check_compatible(m, cache, "mha", "fp", tp_rank=0, tp_size=1)

    cut = _engine_handoff(cache, [2], 40)  # export stopped after a failed store write: a prefix
    m = km.handoff_to_manifest(cut)
    assert (m.num_computed_tokens, len(m.token_ids), m.num_cached_tokens) == (16, 40, 16)
    assert km.manifest_to_handoff(m).blocks == cut.blocks

    unchecked = _build(cache, checksums=False)
    with pytest.raises(km.ManifestError):
        km.manifest_to_handoff(unchecked)
