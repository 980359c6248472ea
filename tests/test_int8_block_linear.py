"""`matmul_activations: int8`: GGUF blocks interleaved 16 rows at a time (int8_blocks.py) and
multiplied with the activations quantized to int8 per 32-wide block (csrc/int8_block_linear.c).
The kernel is checked against a torch reference of that arithmetic (so a wrong layout or scale
shows), against the float matmul (the error int8 codes bring), for results that do not depend on
the batch or the threads, and switched on in the engine, where the one-call decode step gives the
module path's tokens."""
from __future__ import annotations

import shutil

import pytest
import torch

from pdcluster.engine import LLM, SamplingParams, cpu_kernels
from pdcluster.engine.config import EngineConfig
from pdcluster.engine.layers import block_quant, cpu_linear
from pdcluster.engine.layers.int8_blocks import InterleavedBlocks, interleave

pytest.importorskip("gguf")
from test_block_linear import gguf_dense  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernel() -> cpu_kernels.Int8BlockLinearKernel:
    k = cpu_kernels.int8_block_linear_kernel()
    assert k is not None, "the int8 kernel builds wherever a C compiler is"
    return k


def quantize_reference(x: torch.Tensor):
    """Per 32-wide block of each row: int8 codes (nearest, ties to even), scale, the codes' sum."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 1e-30, 1 / torch.where(d > 1e-30, d, 1), 0)
    codes = torch.round(blocks * inv.unsqueeze(-1)).clamp(-128, 127)
    return codes.to(torch.int64), d, codes.sum(-1).to(torch.int64)


def int8_reference(bw: block_quant.BlockWeights, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64, block after block: exact integer dots, then the scales."""
    xq, dx, sx = quantize_reference(x)
    if bw.qtype == "q4_1":
        w = torch.cat([bw.qs & 0x0F, bw.qs >> 4], dim=-1).to(torch.int64)   # [N, nb, 32]
    else:
        w = bw.qs.to(torch.int64)
    dots = torch.einsum("nbk,mbk->mnb", w, xq).double()                 # exact
    out = dots * (bw.d.double().unsqueeze(0) * dx.double().unsqueeze(1))
    if bw.qtype == "q4_1":
        out = out + bw.m.double().unsqueeze(0) * (dx * sx.float()).double().unsqueeze(1)
    return out.sum(-1)


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
@pytest.mark.parametrize("n,k", [(48, 64), (50, 96), (160, 576)])   # 50: a part-filled last group
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17, 33])
def test_kernel_does_the_int8_arithmetic(kernel, qtype, n, k, rows):
    w = gguf_dense(n, k, qtype, seed=rows)
    bw = block_quant.pack_exact(w)
    ib = interleave(bw)
    kernel.check(ib)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows))
    x[0, :32] = 0.0                                   # an all-zero block: scale 0, codes 0
    got = kernel(ib, x)
    want = int8_reference(bw, x)
    assert got.shape == (rows, n)
    # only the float32 roundings of the scales and adds differ from the float64 reference
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # against float activations: the int8 codes' error, a fraction of a percent
    exact = x @ w.T
    assert ((got - exact).norm() / exact.norm()).item() < 0.015


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_a_row_gives_the_same_bits_in_any_batch_and_on_any_thread_count(kernel, qtype):
    bw = block_quant.pack_exact(gguf_dense(96, 192, qtype))
    ib = interleave(bw)
    x = torch.randn(37, 192, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernel(ib, x)
        torch.set_num_threads(max(2, threads))
        together = kernel(ib, x)
        alone = torch.cat([kernel(ib, x[i:i + 1]) for i in range(len(x))])
        pieces = torch.cat([kernel(ib, x[i:i + 7]) for i in range(0, len(x), 7)])
    finally:
        torch.set_num_threads(threads)
    for other in (together, alone, pieces):
        assert torch.equal(single.view(torch.int32), other.view(torch.int32))


def test_check_refuses_what_the_kernel_cannot_read(kernel):
    ib = interleave(block_quant.pack_exact(gguf_dense(32, 64, "q4_1")))
    with pytest.raises(ValueError):
        kernel.check(block_quant.pack_exact(gguf_dense(32, 64, "q4_1")))   # not interleaved
    with pytest.raises(ValueError):
        kernel.check(InterleavedBlocks(ib.qtype, ib.qs[:, :1].contiguous(), ib.d, ib.m, ib.n, ib.k))
    with pytest.raises(ValueError, match="float32"):
        kernel(ib, torch.randn(2, 64, dtype=torch.float64))


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory) -> str:
    from test_decode_layers import _gguf_model
    return _gguf_model(tmp_path_factory.mktemp("q4-llama-int8"))


def _engine(model: str, **kw) -> LLM:
    return LLM(model=model, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8,
               **kw)


PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7, 8, 9] * 7, list(range(200, 233))]


def test_engine_with_int8_activations(q4_model):
    llm = _engine(q4_model, matmul_activations="int8")
    methods = [m.method for m in llm.engine.model.modules()
               if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod)]
    assert methods and all(isinstance(m.blocks, InterleavedBlocks) for m in methods)
    decoder = llm.engine.model.model
    assert decoder.decode_layers is not None, "the one-call decode step takes the int8 kernel too"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    fused = llm.generate(PROMPTS, params)
    alone = [llm.generate([p], params)[0] for p in PROMPTS]
    decoder.decode_layers = None
    modules = llm.generate(PROMPTS, params)
    tokens = lambda outs: [o.token_ids for o in outs]  # noqa: E731
    # batch-invariant: a sequence's tokens do not depend on what it was batched with
    assert tokens(fused) == tokens(modules) == tokens(alone)
    # close to the float32 engine's first-token log-probabilities
    exact = _engine(q4_model)
    assert not any(isinstance(m.method.blocks, InterleavedBlocks) for m in exact.engine.model.modules()
                   if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod))
    firsts = exact.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, logprobs=20))
    for out, first in zip(fused, firsts):
        top = dict(first.logprobs[0].top)
        assert out.token_ids[0] in top   # int8's first token is among float32's top 20
        assert abs(out.logprobs[0].logprob - top[out.token_ids[0]]) < 0.05


def test_int8_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="matmul_activations"):
        EngineConfig(matmul_activations="int4")
    with pytest.raises(ValueError, match="matmul_activations"):
        cpu_linear.use_block_kernels(torch.nn.Linear(4, 4), "bf16")
