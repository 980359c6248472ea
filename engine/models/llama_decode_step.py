"""The Llama decoder's decode steps in one C call (csrc/decode_layers.c) instead of a dozen module
calls per layer, where every layer runs on the CPU kernels.

`use_decode_layers(model)` is called once the block kernels are in place; it gives the decoder a
`DecodeLayers` when the whole stack qualifies: plain Llama layers (no q/k/v bias, no per-head q/k
norm, a gated SiLU MLP), every projection in GGUF blocks, one tensor-parallel rank, the fused small
ops and decode attention built. A step qualifies when it is decode rows only (no prompt chunk), of
a count the block kernel takes, over a cache the attention kernel reads; any other step runs the
modules. Both paths call the same kernels, so they give the same bits.
"""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ..cpu_kernels import (
    CACHE_DTYPES,
    BlockLinearKernel,
    fused_ops_kernel,
    kernel_library,
    paged_decode_kernel,
)
from ..distributed import get_tp
from ..layers.attention import AttentionMetadata
from ..layers.block_quant import BlockWeights
from ..layers.cpu_linear import BlockLinearMethod
from ..layers.interleaved_blocks import InterleavedBlocks

log = logging.getLogger(__name__)

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Kernels(ctypes.Structure):
    _fields_ = [(n, _ptr) for n in ("linear", "rms_norm", "silu_and_mul", "rotary", "write_kv",
                                    "attention")]


class _Blocks(ctypes.Structure):
    _fields_ = [("qtype", _i64), ("qs", _ptr), ("d", _ptr), ("m", _ptr), ("n", _i64), ("k", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _Blocks), ("o", _Blocks),
                ("gate_up", _Blocks), ("down", _Blocks)]


class _Model(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("num_layers", "hidden", "heads", "kv_heads", "head_dim",
                                    "intermediate", "rot_dim")] + [
        ("eps", _f32), ("scale", _f32), ("layers", ctypes.POINTER(_Layer))]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cos", _ptr), ("sin", _ptr), ("cache", _ptr),
                ("cache_layers", _i64), ("block_size", _i64), ("slot_blocks", _ptr),
                ("slot_offsets", _ptr), ("tables", _ptr), ("table_width", _i64), ("lens", _ptr),
                ("work", _ptr), ("linear_scratch", _ptr), ("num_threads", _i64)]


def _blocks(bw: BlockWeights | InterleavedBlocks) -> _Blocks:
    n, k = bw.shape
    m = bw.m if bw.m is not None else bw.d
    return _Blocks(BlockLinearKernel.QTYPES[bw.qtype], bw.qs.data_ptr(), bw.d.data_ptr(),
                   m.data_ptr(), n, k)


class DecodeLayers:
    """Runs a qualifying decoder's layers for a decode step; see the module docstring."""

    def __init__(self, lib: ctypes.CDLL, layers: nn.ModuleList, cfg: dict) -> None:
        self._fn = lib.decode_layers
        self._fn.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Model), ctypes.POINTER(_Step),
                             _ptr]
        self._fn.restype = None
        self._work_floats = lib.decode_layers_work
        self._work_floats.argtypes = [ctypes.POINTER(_Model), _i64]
        self._work_floats.restype = _i64
        # the projections' own kernel (float or integer activations: one for the whole stack)
        self._linear: BlockLinearKernel = layers[0].self_attn.qkv_proj.method.kernel
        self._fused = fused_ops_kernel()
        self._attention = paged_decode_kernel()
        attn = layers[0].self_attn
        self._rotary = attn.rotary
        self._tensors = []   # what the Model struct points into, kept alive with it
        entries, row_ranges = [], [(1, self._fused.max_rows)]
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
            projections = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            row_ranges += [p.method.rows for p in projections]
            weights = [p.method.blocks for p in projections]
            self._tensors += [*norms, *weights]
            entries.append(_Layer(norms[0].data_ptr(), norms[1].data_ptr(), *map(_blocks, weights)))
        self._layers = (_Layer * len(entries))(*entries)
        # step sizes every projection would give the block kernel (and the small ops take)
        self._min_rows = max(lo for lo, _ in row_ranges)
        self._max_rows = min(hi for _, hi in row_ranges)
        self._model = _Model(len(entries), cfg["hidden_size"], attn.num_heads, attn.num_kv_heads,
                             attn.head_dim, mlp.down_proj.in_features, self._rotary.rot_dim,
                             layers[0].input_layernorm.eps, attn.scale, self._layers)
        self._kernels_by_dtype = {}   # the functions the module path calls, by the cache's dtype
        for dtype in CACHE_DTYPES:
            small = self._fused.function_addresses(dtype)
            attention = self._attention.function_address(dtype)
            if small is not None and attention is not None:
                self._kernels_by_dtype[dtype] = _Kernels(
                    self._linear.function_address(), small["rms_norm"], small["silu_and_mul"],
                    small["rotary"], small["write_kv"], attention)
        self._cache_ok: tuple[torch.Tensor, bool] | None = None   # (cache, the kernel reads it)
        self._widest_k = max(self._model.hidden, attn.q_size, self._model.intermediate)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:
        """x [rows, hidden] (the embedded tokens, left as they are) -> the last layer's residual
        stream, or None where this step is not one it takes (the modules run it)."""
        rows = x.shape[0]
        kernels = self._kernels_by_dtype.get(cache.dtype)
        if (kernels is None or meta.prefills or meta.num_decode != rows
                or not self._min_rows <= rows <= self._max_rows or x.dtype != torch.float32
                or x.device.type != "cpu" or not self._reads(cache)):
            return None
        # the index checks the module path makes, once per step
        self._fused.check_slots(meta.slot_blocks, meta.slot_offsets, rows, cache)
        tables, lens = self._attention.checked_tables(meta.decode_block_tables, meta.decode_lens,
                                                       rows, cache)
        cos, sin = (t.squeeze(1) for t in self._rotary.cos_sin(positions))
        if cos.shape != (rows, self._model.rot_dim) or not cos.is_contiguous() or not sin.is_contiguous():
            return None
        threads = torch.get_num_threads()
        work = torch.empty(self._work_floats(ctypes.byref(self._model), rows), dtype=torch.float32)
        scratch = torch.empty(max(1, self._linear.scratch_floats(rows, self._widest_k, threads)),
                              dtype=torch.float32)
        x = x.contiguous().clone()
        s = _Step()   # per call: the C code reads it while ctypes has released the GIL
        s.rows, s.cos, s.sin, s.cache = rows, cos.data_ptr(), sin.data_ptr(), cache.data_ptr()
        s.cache_layers, s.block_size = cache.shape[1], cache.shape[2]
        s.slot_blocks, s.slot_offsets = meta.slot_blocks.data_ptr(), meta.slot_offsets.data_ptr()
        s.tables, s.table_width, s.lens = tables.data_ptr(), tables.shape[1], lens.data_ptr()
        s.work, s.linear_scratch, s.num_threads = work.data_ptr(), scratch.data_ptr(), threads
        self._fn(ctypes.byref(kernels), ctypes.byref(self._model), ctypes.byref(s), x.data_ptr())
        return x

    def _reads(self, cache: torch.Tensor) -> bool:
        """Whether the attention kernel takes this cache (an engine's cache never changes: checked
        once)."""
        if self._cache_ok is None or self._cache_ok[0] is not cache:
            m = self._model
            q = torch.empty(1, m.heads, m.head_dim, dtype=torch.float32)
            self._cache_ok = (cache, cache.device.type == "cpu" and cache.dim() == 6
                              and cache.shape[1] >= m.num_layers
                              and cache.shape[3:] == (2, m.kv_heads, m.head_dim)
                              and self._attention.supports(q, cache))
        return self._cache_ok[1]


def _qualifies(model: nn.Module) -> str | None:
    """Why the decoder cannot run its decode steps in one call, or None."""
    from .llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or get_tp().size != 1:
        return "not a single-rank decoder"
    if not isinstance(layers[0], LlamaDecoderLayer) or type(layers[0].mlp) is not LlamaMLP:
        return "layer 0 is not a plain Llama layer"
    first: LlamaAttention = layers[0].self_attn
    hidden, inter = model.config["hidden_size"], layers[0].mlp.down_proj.in_features
    q, kv = first.q_size, first.kv_size
    # the C code sizes its work space from these
    shapes = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    for i, layer in enumerate(layers):
        if not isinstance(layer, LlamaDecoderLayer) or type(layer.mlp) is not LlamaMLP:
            return f"layer {i} is not a plain Llama layer"
        a: LlamaAttention = layer.self_attn
        projections = (a.qkv_proj, a.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if (a.qk_norm or a.layer != i or a.rotary is not first.rotary
                or any("bias" in p.specs for p in projections)):
            return f"layer {i} has q/k norms, biases or its own rotary"
        if not all(isinstance(p.method, BlockLinearMethod)
                   and p.method.kernel is first.qkv_proj.method.kernel for p in projections):
            return f"layer {i} has projections outside GGUF blocks, or on another block kernel"
        if [p.method.blocks.shape for p in projections] != shapes:
            return f"layer {i} has projections of other shapes than layer 0's"
        if any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() or n.weight.shape != (hidden,)
               for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return f"layer {i} has norms that are not float32 [hidden]"
    rotary = first.rotary
    if (rotary.rot_dim > first.head_dim or rotary.rot_dim % 2
            or rotary.cos.dtype != torch.float32):
        return "rotary tables the fused kernel does not take"
    return None


def use_decode_layers(model: nn.Module) -> bool:
    """Give `model`'s decoder a DecodeLayers if it qualifies; returns whether it did."""
    if None in (fused_ops_kernel(), paged_decode_kernel()):
        return False
    if (why := _qualifies(model)) is not None:
        log.debug("decode steps run layer by layer: %s", why)
        return False
    lib = kernel_library("decode_layers")
    if lib is None:
        return False
    model.model.decode_layers = DecodeLayers(lib, model.model.layers, model.config)
    return True
