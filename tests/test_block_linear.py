"""GGUF block weights: recovered bit for bit from dense weights (block_quant.py), multiplied by the
compiled kernel (csrc/block_linear.c) as BLAS multiplies the dense weight, and switched on for the
embedded model's layers (cpu_linear.py). Blocks are made by gguf's own quantizer."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdcluster.engine.layers import block_quant, cpu_linear
from pdcluster.engine import cpu_kernels
from pdcluster.engine.layers.block_quant import BlockWeights, pack_exact
from pdcluster.engine.layers.interleaved_blocks import InterleavedBlocks, deinterleave

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

needs_compiler = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                    reason="no C compiler on this machine")

FORMATS = {"q4_1": QT.Q4_1, "q8_0": QT.Q8_0}


def gguf_dense(rows: int, cols: int, qtype: str, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    """A weight as the GGUF loader hands it over: quantized by gguf, dequantized by gguf."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    w[0, :32] = 0.0                                  # a constant block (scale 0)
    t = FORMATS[qtype]
    return torch.from_numpy(np.array(quants.dequantize(quants.quantize(w, t), t), dtype=np.float32))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("scale", [0.05, 1e-6])   # 1e-6: fp16 scales underflow, gguf gives -0.0
def test_pack_recovers_gguf_blocks_exactly(qtype, scale):
    w = gguf_dense(24, 96, qtype, scale=scale)
    bw = pack_exact(w)
    assert bw is not None and bw.qtype == qtype and bw.shape == (24, 96)
    assert same_bits(block_quant.dequantize(bw), w)
    bytes_per_weight = bw.nbytes / w.numel()
    assert bytes_per_weight < {"q4_1": 0.8, "q8_0": 1.2}[qtype]   # vs 4 for float32


def test_pack_survives_stacking_and_slicing():
    """q/k/v stacked, then a tensor-parallel rank's rows and a 32-aligned input slice."""
    parts = [gguf_dense(n, 128, "q4_1", seed=i) for i, n in enumerate((64, 16, 16))]
    stacked = torch.cat(parts)
    for w in (stacked, stacked[8:40], stacked[:, 32:96].contiguous()):
        bw = pack_exact(w)
        assert bw is not None and same_bits(block_quant.dequantize(bw), w)


def test_pack_refuses_what_blocks_cannot_reproduce():
    g = torch.Generator().manual_seed(0)
    assert pack_exact(torch.randn(64, 128, generator=g)) is None            # ordinary fp32 weights
    w = gguf_dense(64, 128, "q4_1")
    assert pack_exact(w.to(torch.bfloat16)) is None
    assert pack_exact(w[:, :100].contiguous()) is None                      # not whole blocks
    nudged = w.clone()
    nudged[40, 7] = torch.nextafter(nudged[40, 7], torch.tensor(1.0))      # one weight off by 1 ulp
    assert pack_exact(nudged) is None


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.block_linear_kernel()
    if k is None:
        pytest.skip("no C compiler: the kernel is not built")
    return k


@needs_compiler
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 15, 16, 27, 28, 32, 33, 70])  # each tile, rests
@pytest.mark.parametrize("out_features,in_features", [(100, 64), (24, 576), (7, 32),
                                                      (13, 4096)])  # x in several L2-sized row blocks
def test_kernel_matches_blas_on_the_dense_weight(kernel, qtype, rows, out_features, in_features):
    w = gguf_dense(out_features, in_features, qtype, seed=rows)
    bw = pack_exact(w)
    kernel.check(bw)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    got = kernel(bw, x)
    # the same weights, summed in another order: float32 rounding only
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernel_rejects_what_it_cannot_read(kernel):
    bw = pack_exact(gguf_dense(16, 64, "q4_1"))
    with pytest.raises(ValueError, match="float32 CPU"):
        kernel(bw, torch.randn(4, 32))                    # wrong input width
    with pytest.raises(ValueError, match="float32 CPU"):
        kernel(bw, torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="layout"):
        kernel.check(BlockWeights("q4_1", bw.qs[:, :1], bw.d, bw.m))
    with pytest.raises(ValueError, match="layout"):
        kernel.check(BlockWeights("q4_1", bw.qs, bw.d.double(), bw.m))
    with pytest.raises(ValueError, match="layout"):
        kernel.check(BlockWeights("q4_1", bw.qs, bw.d, None))       # Q4_1 without its minimums
    with pytest.raises(ValueError, match="layout"):
        kernel.check(BlockWeights("q4_1", bw.qs[:, :0], bw.d[:, :0], bw.m[:, :0]))   # K = 0
    with pytest.raises(ValueError, match="no kernel"):
        kernel.check(BlockWeights("q5_k", bw.qs, bw.d, bw.m))


@needs_compiler
def test_method_uses_the_kernel_only_for_decode_sized_batches(kernel, monkeypatch):
    w = gguf_dense(48, 64, "q8_0")
    method = cpu_linear.BlockLinearMethod(pack_exact(w), kernel, rows=(4, 8))
    calls = []
    monkeypatch.setattr(method, "kernel", lambda bw, x: calls.append(x.shape[0]) or kernel(bw, x))
    for rows in (2, 4, 8, 9):
        x = torch.randn(1, rows, 64)                      # leading dims are folded into rows
        torch.testing.assert_close(method.apply({"weight": w}, x), F.linear(x, w),
                                   rtol=1e-5, atol=1e-5)
    assert calls == [4, 8]


@needs_compiler
def test_embedded_model_runs_its_linears_from_blocks(llm):
    """Every projection and the (tied, Q8_0) LM head of the embedded Q4_1 GGUF is switched over,
    and the blocks are the weights the dense model holds."""
    model = llm.engine.model
    methods = {name: mod.method for name, mod in model.named_modules() if hasattr(mod, "method")}
    block = {n: m for n, m in methods.items() if isinstance(m, cpu_linear.BlockLinearMethod)}
    assert len(block) == len(methods) == 4 * model.num_layers + 1
    assert block["lm_head"].blocks.qtype == "q8_0"
    layer = model.model.layers[0]
    for mod in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
        blocks = mod.method.blocks
        if isinstance(blocks, InterleavedBlocks):   # matmul_activations int16 / int8
            blocks = deinterleave(blocks)
        assert blocks.qtype == "q4_1"
        assert same_bits(block_quant.dequantize(blocks), mod.weight)
