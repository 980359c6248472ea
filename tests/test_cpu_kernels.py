"""CPU speed plumbing: the compiled decode-attention kernel against the torch reference path of
paged_attention, and the allocator setting the engine applies on the CPU."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest
import torch

from pdcluster.engine import cpu_kernels
from pdcluster.engine.layers import activation, attention, norm, rotary
from pdcluster.engine.layers.activation import silu_and_mul
from pdcluster.engine.layers.norm import RMSNorm
from pdcluster.engine.layers.rotary import RotaryEmbedding
from pdcluster.engine.layers.attention import AttentionMetadata, paged_attention

needs_compiler = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                    reason="no C compiler on this machine")


@pytest.fixture
def kernel():
    k = cpu_kernels.paged_decode_kernel()
    assert k is not None, "a C compiler is present, so the kernel must build"
    return k


def _decode_case(seed, lens, heads, kv_heads, head_dim, block_size, num_layers=3, num_blocks=64):
    """A random cache with the sequences' blocks scattered (and the first block shared)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, num_layers, block_size, 2, kv_heads, head_dim, generator=g)
    width = max(-(-n // block_size) for n in lens)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = perm[: len(lens) * width].view(len(lens), width).clone()
    tables[:, 0] = 0                       # a shared prefix block, as prefix caching makes
    lens_t = torch.tensor(lens)
    t = len(lens)
    meta = AttentionMetadata(
        slot_blocks=tables[torch.arange(t), (lens_t - 1) // block_size],
        slot_offsets=(lens_t - 1) % block_size, num_decode=t, decode_block_tables=tables,
        decode_mask=(torch.arange(width * block_size)[None, :] < lens_t[:, None])[:, None, None, :],
        decode_lens=lens_t)
    q = torch.randn(t, heads, head_dim, generator=g)
    k = torch.randn(t, kv_heads, head_dim, generator=g)
    v = torch.randn(t, kv_heads, head_dim, generator=g)
    return cache, meta, q, k, v


def _both_paths(monkeypatch, cache, meta, q, k, v, layer):
    scale = q.shape[-1] ** -0.5
    fast_cache = cache.clone()
    fast = paged_attention(q, k, v, fast_cache, layer, meta, scale)
    with monkeypatch.context() as m:
        m.setattr(attention, "paged_decode_kernel", lambda: None)
        ref = paged_attention(q, k, v, cache, layer, meta, scale)
    assert torch.equal(fast_cache, cache)          # both wrote this step's k/v the same way
    return fast, ref


@needs_compiler
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),      # SmolLM2: grouped-query, the inlined head_dim-64 path
    (8, 8, 128, 16),     # plain multi-head, head_dim 128
    (16, 2, 32, 8),      # group of 8, a head_dim the kernel handles generically, small blocks
    (4, 2, 24, 16),      # a head_dim that is no multiple of 16: element by element
])
def test_kernel_matches_torch_path(monkeypatch, kernel, heads, kv_heads, head_dim, block_size,
                                   cache_dtype):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 5 * block_size, 37]
    cache, meta, q, k, v = _decode_case(0, lens, heads, kv_heads, head_dim, block_size)
    # a half-width cache: both paths write this step's k/v rounded the same way (checked in
    # _both_paths) and attend in float32 over the same rounded entries
    cache = cache.to(cache_dtype)
    assert kernel.supports(q, cache)      # or both sides would be the torch path
    for layer in range(cache.shape[1]):
        fast, ref = _both_paths(monkeypatch, cache, meta, q, k, v, layer)
        # same math, different summation order (online softmax per block vs one softmax)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernel_reads_the_cache_in_place_with_extreme_scores(monkeypatch, kernel):
    """Large logits (online-softmax rescaling across blocks) stay finite and match."""
    cache, meta, q, k, v = _decode_case(1, [70, 3, 33], 4, 2, 64, 16)
    fast, ref = _both_paths(monkeypatch, cache * 30, meta, q * 30, k * 30, v, 1)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_bad_tables_raise_instead_of_reading_outside_the_cache(kernel):
    cache, meta, q, _, _ = _decode_case(2, [20, 5], 4, 2, 64, 16)
    bad = meta.decode_block_tables.clone()
    bad[0, 1] = cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        kernel(q, cache, 0, bad, meta.decode_lens, 0.125)
    with pytest.raises(ValueError, match="outside the cache"):
        kernel(q, cache, 0, meta.decode_block_tables, torch.tensor([20, 999]), 0.125)
    with pytest.raises(ValueError, match="outside the cache"):      # no blocks for a non-empty context
        kernel(q, cache, 0, meta.decode_block_tables[:, :0], meta.decode_lens, 0.125)
    for layer in (-1, cache.shape[1]):
        with pytest.raises(ValueError, match="layer"):
            kernel(q, cache, layer, meta.decode_block_tables, meta.decode_lens, 0.125)
    for bad_q in (q[..., :16], q[:, :3], q.reshape(2, -1), q[:1]):
        with pytest.raises(ValueError):
            kernel(bad_q, cache, 0, meta.decode_block_tables, meta.decode_lens, 0.125)


@needs_compiler
def test_unsupported_inputs_fall_back_to_torch(kernel):
    cache, meta, q, _, _ = _decode_case(3, [5], 4, 2, 64, 16)
    assert kernel.supports(q, cache)
    assert kernel.supports(q, cache.to(torch.bfloat16)) and kernel.supports(q, cache.to(torch.float16))
    assert not kernel.supports(q, cache.to(torch.float64))
    assert not kernel.supports(q.to(torch.bfloat16), cache)
    assert not kernel.supports(q.to(torch.bfloat16), cache.to(torch.bfloat16))  # q stays float32
    assert not kernel.supports(q[:, :3], cache)               # 3 heads over 2 kv heads
    assert not kernel.supports(q[..., :32], cache)            # head_dim differs from the cache's
    assert not kernel.supports(q.reshape(q.shape[0], -1), cache)


@pytest.fixture
def fused():
    k = cpu_kernels.fused_ops_kernel()
    assert k is not None, "a C compiler is present, so the kernel must build"
    return k


@needs_compiler
def test_fused_ops_match_the_torch_path(monkeypatch, fused):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 96, generator=g) * 3
    norm_layer = RMSNorm(96, 1e-5)
    norm_layer.weight.data = torch.randn(96, generator=g)
    head_norm = RMSNorm(32, 1e-6)                           # per head (Qwen3's q/k norm)
    head_norm.weight.data = torch.randn(32, generator=g)
    gate_up = torch.randn(7, 2 * 80, generator=g) * 6
    qkv = torch.randn(7, 6 + 2 * 2, 32, generator=g)        # 6 q heads, 2 kv heads, in one tensor
    positions = torch.tensor([0, 5, 17, 300, 1023, 2, 9])
    ropes = [RotaryEmbedding(32, 1024, 10000.0), RotaryEmbedding(16, 1024, 500.0)]  # full, partial

    def run():
        rotated = [r(positions, qkv[:, :8], qkv[:, 6:8]) for r in ropes]
        for r in ropes:
            r._last_positions = None
        return (norm_layer(x), head_norm(qkv[:, :6].contiguous()), silu_and_mul(gate_up), rotated)

    fast = run()
    with monkeypatch.context() as m:
        for module in (norm, rotary, activation):
            m.setattr(module, "fused_ops_kernel", lambda: None)
        ref = run()
    # rotary rounds as torch does (same products, same sums); the norm's mean and SiLU's exp may
    # differ in the last bits
    assert all(torch.equal(a, b) for fr, rr in zip(fast[3], ref[3]) for a, b in zip(fr, rr))
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@needs_compiler
def test_fused_kv_write_matches_torch_and_checks_slots(fused):
    cache, meta, _, k, v = _decode_case(5, [20, 5, 33], 4, 2, 64, 16)
    ref = cache.clone()
    attention.write_kv(ref, 1, torch.stack((k, v), dim=1), meta)
    assert fused.write_kv(cache, 1, k, v, meta.slot_blocks, meta.slot_offsets)
    assert torch.equal(cache, ref)
    bad = meta.slot_blocks.clone()
    bad[1] = cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        fused.write_kv(cache, 1, k, v, bad, meta.slot_offsets)
    assert torch.equal(cache, ref)                             # nothing written
    # inputs it does not take: the caller's torch path writes them
    assert not fused.write_kv(cache.to(torch.float64), 1, k, v, meta.slot_blocks, meta.slot_offsets)
    assert not fused.write_kv(cache, 1, k[..., :32], v[..., :32], meta.slot_blocks, meta.slot_offsets)
    assert fused.rms_norm(torch.randn(fused.max_rows + 1, 8), torch.ones(8), 1e-6) is None
    assert fused.silu_and_mul(torch.randn(3, 8, dtype=torch.float64)) is None


@needs_compiler
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_fused_kv_write_into_a_half_cache_rounds_as_torch_does(fused, cache_dtype):
    cache, meta, _, k, v = _decode_case(6, [20, 5, 33], 4, 2, 64, 16)
    cache = cache.to(cache_dtype)
    # values that round up, overflow float16, vanish, or are not numbers
    k[0, 0, :6] = torch.tensor([1 + 2**-9, 7e4, -1e6, 1e-9, float("inf"), float("nan")])
    v[1, 1, :3] = torch.tensor([float("-inf"), 3.0000001, -0.0])
    ref = cache.clone()
    attention.write_kv(ref, 2, torch.stack((k, v), dim=1), meta)
    assert fused.write_kv(cache, 2, k, v, meta.slot_blocks, meta.slot_offsets)
    # the same values (a NaN where torch's has one, whatever its payload)
    torch.testing.assert_close(cache.float(), ref.float(), rtol=0, atol=0, equal_nan=True)
    assert cache.float().isnan().sum() == 1


def _no_kernels() -> bool:
    return (cpu_kernels.paged_decode_kernel() is None and cpu_kernels.block_linear_kernel() is None
            and cpu_kernels.fused_ops_kernel() is None)


def test_no_compiler_or_switched_off_means_torch_path(monkeypatch):
    cpu_kernels.reset()
    try:
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
        assert _no_kernels()
        cpu_kernels.reset()
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
        assert _no_kernels()
    finally:
        cpu_kernels.reset()


@needs_compiler
def test_one_openmp_runtime_shared_with_torch_or_no_kernel(monkeypatch, kernel):
    # torch's wheel ships libgomp.so.1, which the kernel's -fopenmp link resolves to
    ours, torchs = cpu_kernels.openmp_runtimes(cpu_kernels.kernel_library("paged_decode_attention"))
    assert ours is not None and ours == torchs
    cpu_kernels.reset()
    try:
        monkeypatch.setattr(cpu_kernels, "openmp_runtimes",
                            lambda lib: ("/usr/lib/libgomp.so.1", "/torch.libs/libgomp-a34b3233.so.1"))
        assert _no_kernels()
    finally:
        cpu_kernels.reset()


@needs_compiler
def test_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))
    compiler = shutil.which("gcc") or shutil.which("cc")
    first = cpu_kernels._build(compiler, "paged_decode_attention")
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler, "paged_decode_attention") == first
    assert first.stat().st_mtime_ns == stamp


@needs_compiler
def test_another_version_of_a_source_builds_beside_the_engines(monkeypatch, tmp_path):
    """A benchmark's baseline (bench_kernels --against): another csrc/<name>.c compiled into its own
    library, loaded beside the engine's; here a copy whose limit reads differently."""
    ours = cpu_kernels.paged_decode_kernel()
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path / "cache"))
    source = (cpu_kernels._CSRC / "paged_decode_attention.c").read_text()
    changed = tmp_path / "paged_decode_attention.c"
    changed.write_text(source.replace("#define MAX_GROUP 32 ", "#define MAX_GROUP 31 "))
    theirs = cpu_kernels.PagedDecodeKernel(
        cpu_kernels.library_from_source("paged_decode_attention", changed))
    assert (ours.max_group, theirs.max_group) == (32, 31)
    cache, meta, q, _, _ = _decode_case(3, [20, 7], 8, 2, 64, 16)
    args = (q, cache, 1, meta.decode_block_tables, meta.decode_lens, 0.125)
    assert torch.equal(ours(*args), theirs(*args))


_RSS_AFTER_FREE = """
import os, sys, torch
from pdcluster.engine.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
t = torch.ones(24 << 18)       # 24 MiB, touched
before = rss()
del t
print((before - rss()) >> 20)  # MiB given back to the OS by the free
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_keeps_a_freed_activation_in_the_process():
    """glibc by default unmaps a freed 24 MiB buffer (the next step faults it back in); with the
    engine's setting it stays in the heap for the next allocation."""
    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True,
                             text=True, check=True, timeout=120)
        return int(out.stdout.split()[-1])
    assert returned("default") >= 20
    assert returned("keep") <= 4
