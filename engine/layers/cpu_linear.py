"""Decode-sized matmuls on the CPU through the block-quantized kernel."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..config import MATMUL_ACTIVATIONS
from ..cpu_kernels import BlockLinearKernel, block_linear_kernel, integer_block_linear_kernel
from .block_quant import BlockWeights, pack_exact
from .interleaved_blocks import InterleavedBlocks, interleave
from .linear import Linear, ParallelLMHead
from .quant import LinearMethod

# After loading, `use_block_kernels` gives every dense float32 linear layer (and the LM head) whose
# weight is exactly a GGUF Q4_1/Q8_0 encoding (block_quant.pack_exact) a `BlockLinearMethod`: steps
# of up to a few hundred rows (decode batches, small prefill chunks) read the blocks, 4.5 / 8.5 bits
# per weight; bigger ones keep BLAS on the dense weight, which it multiplies faster at large M. Both
# multiply by bit-identical weights. With integer activations (`matmul_activations`, below) every step
# size takes the integer kernel (csrc/integer_block_linear.c), which beats BLAS at any M here.

log = logging.getLogger(__name__)

# most rows of x for which the kernel beats BLAS on the dense weight (2-core AVX-512: above ~256
# rows BLAS's blocking wins, the weight's bytes no longer matter)
MAX_ROWS = 256

# what a GGUF-block layer multiplies its input as (MATMUL_ACTIVATIONS less "auto"): "float32", the
# dense model's arithmetic (summed in another order); "int16", quantized per 32-wide block to 16 bits
# (~2e-5 error per matmul, 1.2-1.7x faster here); "int8", to 8 bits as llama.cpp does (~0.6% error
# per matmul, 1.2-2.3x faster here; on the embedded 135M model it changes answers, as llama.cpp's own
# does)
RESOLVED = tuple(a for a in MATMUL_ACTIVATIONS if a != "auto")


def resolve_matmul_activations(setting: str, device: str) -> str:
    """EngineConfig.matmul_activations for an engine on `device` ("cpu", "npu", ...): "auto" is
    int16 on a CPU where the integer kernel has its AVX512-VNNI path, else float32; an integer type
    anywhere but on the CPU is refused (the kernels are the CPU's)."""
    if setting == "auto":
        kernel = integer_block_linear_kernel(16) if device == "cpu" else None
        return "int16" if kernel is not None and kernel.vnni else "float32"
    if setting not in RESOLVED:
        raise ValueError(f"matmul_activations must be one of {MATMUL_ACTIVATIONS}, got {setting!r}")
    if setting != "float32" and device != "cpu":
        raise ValueError(f"matmul_activations={setting!r} is a CPU kernel's; this engine runs on {device}")
    return setting


class BlockLinearMethod(LinearMethod):
    def __init__(self, blocks: BlockWeights | InterleavedBlocks, kernel: BlockLinearKernel,
                 rows: tuple[int, int] | None = None) -> None:
        kernel.check(blocks)
        self.blocks = blocks
        self.kernel = kernel
        self.rows = rows or (kernel.min_rows, MAX_ROWS)

    def apply(self, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (self.rows[0] <= rows <= self.rows[1] and x.dtype == torch.float32
                and x.device.type == "cpu"):
            y = self.kernel(self.blocks, x.reshape(rows, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return super().apply(w, x)


def _candidates(model: nn.Module):
    """(name, module, its dense weight) for every plain linear layer and LM head."""
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and type(mod.method) is LinearMethod and not mod.num_experts:
            yield name, mod, mod.weight
        elif isinstance(mod, ParallelLMHead) and type(mod.method) is LinearMethod:
            yield name, mod, mod.rows.weight


@torch.no_grad()
def use_block_kernels(model: nn.Module, activations: str = "float32") -> int:
    """Switch the layers whose weights are GGUF blocks to the kernel for `activations` (one of
    RESOLVED); returns how many were."""
    if activations not in RESOLVED:
        raise ValueError(f"matmul_activations must be one of {RESOLVED}, got {activations!r}")
    integer = activations != "float32"
    kernel = integer_block_linear_kernel(int(activations[3:])) if integer else block_linear_kernel()
    if kernel is None:
        if integer:
            log.warning("%s matmul kernel unavailable: GGUF-block layers stay dense (float32)", activations)
        return 0
    # every step size on the integer kernel, but for its portable path (no AVX512-VNNI), which is
    # there for correctness, not speed: then prompt chunks over MAX_ROWS keep BLAS
    rows = (1, 1 << 62) if integer and kernel.vnni else (kernel.min_rows, MAX_ROWS)
    if integer and not kernel.vnni:
        log.warning("this CPU has no AVX512-VNNI: %s activations take the kernel's slow portable path "
                    "(up to %d rows; BLAS in float32 above)", activations, MAX_ROWS)
    switched, nbytes, dense = 0, 0, []
    for name, mod, weight in _candidates(model):
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        blocks = pack_exact(weight)
        if blocks is None:
            dense.append(name)
            continue
        if integer:
            blocks = interleave(blocks)
        mod.method = BlockLinearMethod(blocks, kernel, rows=rows)
        switched += 1
        nbytes += blocks.nbytes
    if switched:
        log.info("%d linear layers also kept as GGUF blocks (%.0f MiB), multiplied with %s activations",
                 switched, nbytes / 2**20, activations)
        if dense:   # e.g. a GGUF quantized with an importance matrix: its codes need not span 0..15
            log.info("%d layers stay dense (no exact Q4_1/Q8_0 encoding found), e.g. %s",
                     len(dense), ", ".join(dense[:3]))
    return switched
