"""RMSNorm, computed in float32 as `transformers` does so greedy outputs match."""
from __future__ import annotations

import torch
from torch import nn

from ..cpu_kernels import fused_ops_kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops_kernel() if x.device.type == "cpu" else None
        if fused is not None and (out := fused.rms_norm(x, self.weight, self.eps)) is not None:
            return out
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
