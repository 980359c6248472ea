"""`matmul_activations` int16 / int8: GGUF blocks interleaved 16 rows at a time
(interleaved_blocks.py) and multiplied with the activations quantized to 16- or 8-bit integers per
32-wide block (csrc/integer_block_linear.c). The kernel is checked against a torch reference of that
arithmetic (so a wrong layout or scale shows), against the float matmul (the error the codes bring),
for results that do not depend on the batch or the threads, and switched on in the engine, where the
one-call decode step gives the module path's tokens."""
from __future__ import annotations

import shutil

import pytest
import torch

from pdcluster.engine import LLM, SamplingParams, cpu_kernels
from pdcluster.engine.config import EngineConfig
from pdcluster.engine.layers import block_quant, cpu_linear
from pdcluster.engine.layers.interleaved_blocks import InterleavedBlocks, deinterleave, interleave

pytest.importorskip("gguf")
from test_block_linear import gguf_dense  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler on this machine")


BITS = [16, 8]
# error relative to the float matmul's output, by bits (measured ~2e-5 and ~6e-3)
MAX_ERROR = {16: 1e-4, 8: 0.015}


@pytest.fixture(scope="module", params=BITS, ids=lambda b: f"int{b}")
def kernel(request) -> cpu_kernels.IntegerBlockLinearKernel:
    k = cpu_kernels.integer_block_linear_kernel(request.param)
    assert k is not None, "the integer kernel builds wherever a C compiler is"
    assert k.bits == request.param
    return k


def quantize_reference(x: torch.Tensor, bits: int):
    """Per 32-wide block of each row: integer codes (nearest, ties to even), scale, the codes' sum."""
    top = 2 ** (bits - 1) - 1
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / top
    inv = torch.where(d > 1e-30, 1 / torch.where(d > 1e-30, d, 1), 0)
    codes = torch.round(blocks * inv.unsqueeze(-1)).clamp(-top - 1, top)
    return codes.to(torch.int64), d, codes.sum(-1).to(torch.int64)


def integer_reference(bw: block_quant.BlockWeights, x: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's arithmetic in float64, block after block: exact integer dots, then the scales."""
    xq, dx, sx = quantize_reference(x, bits)
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
def test_kernel_does_the_integer_arithmetic(kernel, qtype, n, k, rows):
    w = gguf_dense(n, k, qtype, seed=rows)
    bw = block_quant.pack_exact(w)
    ib = interleave(bw)
    kernel.check(ib)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows))
    x[0, :32] = 0.0                                   # an all-zero block: scale 0, codes 0
    got = kernel(ib, x)
    want = integer_reference(bw, x, kernel.bits)
    assert got.shape == (rows, n)
    # only the float32 roundings of the scales and adds differ from the float64 reference
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # against float activations: the codes' error
    exact = x.double() @ w.double().T
    assert ((got.double() - exact).norm() / exact.norm()).item() < MAX_ERROR[kernel.bits]


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
    return _gguf_model(tmp_path_factory.mktemp("q4-llama-integer"))


def _engine(model: str, **kw) -> LLM:
    return LLM(model=model, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8,
               **kw)


PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7, 8, 9] * 7, list(range(200, 233))]


@pytest.mark.parametrize("bits", BITS)
def test_engine_with_integer_activations(q4_model, bits):
    llm = _engine(q4_model, matmul_activations=f"int{bits}")
    methods = [m.method for m in llm.engine.model.modules()
               if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod)]
    assert methods and all(isinstance(m.blocks, InterleavedBlocks) for m in methods)
    decoder = llm.engine.model.model
    assert decoder.decode_layers is not None, "the one-call decode step takes the integer kernel too"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    fused = llm.generate(PROMPTS, params)
    alone = [llm.generate([p], params)[0] for p in PROMPTS]
    decoder.decode_layers = None
    modules = llm.generate(PROMPTS, params)
    tokens = lambda outs: [o.token_ids for o in outs]  # noqa: E731
    # batch-invariant: a sequence's tokens do not depend on what it was batched with
    assert tokens(fused) == tokens(modules) == tokens(alone)
    # close to the float32 engine's first-token log-probabilities
    exact = _engine(q4_model, matmul_activations="float32")
    assert not any(isinstance(m.method.blocks, InterleavedBlocks) for m in exact.engine.model.modules()
                   if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod))
    firsts = exact.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, logprobs=20))
    for out, first in zip(fused, firsts):
        top = dict(first.logprobs[0].top)
        assert out.token_ids[0] in top   # the first token is among float32's top 20
        assert abs(out.logprobs[0].logprob - top[out.token_ids[0]]) < {16: 2e-4, 8: 0.05}[bits]


def test_other_activation_types_are_refused():
    with pytest.raises(ValueError, match="matmul_activations"):
        EngineConfig(matmul_activations="int4")
    with pytest.raises(ValueError, match="matmul_activations"):
        cpu_linear.use_block_kernels(torch.nn.Linear(4, 4), "bf16")
    with pytest.raises(ValueError, match="CPU kernel"):
        cpu_linear.resolve_matmul_activations("int8", "npu")


def test_auto_is_int16_on_a_cpu_with_vnni_and_float32_elsewhere(q4_model):
    vnni = cpu_kernels.integer_block_linear_kernel(16).vnni
    assert cpu_linear.resolve_matmul_activations("auto", "cpu") == ("int16" if vnni else "float32")
    assert cpu_linear.resolve_matmul_activations("auto", "npu") == "float32"
    assert cpu_linear.resolve_matmul_activations("float32", "npu") == "float32"
    engine = _engine(q4_model).engine     # the default
    assert engine.matmul_activations == ("int16" if vnni else "float32")
    kernels = {m.method.kernel for m in engine.model.modules()
               if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod)}
    assert kernels == {cpu_kernels.integer_block_linear_kernel(16) if vnni
                       else cpu_kernels.block_linear_kernel()}


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_interleave_keeps_every_code_and_scale(qtype):
    bw = block_quant.pack_exact(gguf_dense(50, 96, qtype))   # 50 rows: the last group part-filled
    ib = interleave(bw)
    assert ib.shape == bw.shape and ib.qs.shape[0] == 4
    back = deinterleave(ib)
    assert torch.equal(back.qs, bw.qs) and torch.equal(back.d, bw.d)
    assert (back.m is None) == (bw.m is None) and (bw.m is None or torch.equal(back.m, bw.m))


def test_portable_build_gives_the_same_bits(kernel, tmp_path):
    """The C path for CPUs without AVX512-VNNI (forced with -DPORTABLE) against the vector one."""
    import ctypes
    import subprocess
    if not kernel.vnni:
        pytest.skip("this CPU takes the portable path already")
    source = cpu_kernels._CSRC / "integer_block_linear.c"
    lib = tmp_path / "portable.so"
    subprocess.run([shutil.which("gcc") or shutil.which("cc"), *cpu_kernels._CFLAGS, "-DPORTABLE", "-o",
                    str(lib), str(source), *cpu_kernels._LIBS], check=True, capture_output=True, timeout=120)
    portable = cpu_kernels.IntegerBlockLinearKernel(ctypes.CDLL(str(lib)), kernel.bits)
    assert not portable.vnni
    for qtype in ("q4_1", "q8_0"):
        for n, k, rows in ((40, 96, 11), (16, 32, 1), (33, 192, 9)):
            ib = interleave(block_quant.pack_exact(gguf_dense(n, k, qtype)))
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n))
            x[0, :32] = 0.0
            x[-1, 3] = 1e-38       # a block of ~0: too small a scale to invert
            x[-1, 4:32] = 0.0
            x[rows // 2, 5] = float("nan")
            a, b = portable(ib, x), kernel(ib, x)
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num().view(torch.int32), b.nan_to_num().view(torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_infinite_input_gives_nan_outputs_in_its_row_only(kernel, bad):
    ib = interleave(block_quant.pack_exact(gguf_dense(40, 96, "q4_1")))
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(9))
    x[2, 40] = bad
    y = kernel(ib, x)
    assert y[2].isnan().all()            # as float activations would (inf * 0-weights: NaN there)
    assert torch.isfinite(y[[0, 1, 3]]).all()
    assert torch.equal(y[[0, 1, 3]], kernel(ib, x[[0, 1, 3]]))
