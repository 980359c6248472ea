"""The gated MLP activation: SiLU(gate) * up over a stacked gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpu_kernels import fused_ops_kernel


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    fused = fused_ops_kernel() if gate_up.device.type == "cpu" else None
    if fused is not None and (out := fused.silu_and_mul(gate_up)) is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
