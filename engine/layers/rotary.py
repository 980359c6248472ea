"""Rotary position embeddings (neox style; default, linear and llama3 scaling), tables in float32.

Numerics follow `transformers` so greedy outputs match.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..cpu_kernels import fused_ops_kernel


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate_half) over the first `rot_dim` dims, cached cos/sin."""

    def __init__(self, rot_dim: int, max_positions: int, base: float,
                 scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        attention_factor = 1.0
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind not in ("default", None):
            raise NotImplementedError(f"rope scaling {kind!r} is not supported by this model")
        self.rot_dim = rot_dim
        self.max_positions = max_positions
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self._last_positions: torch.Tensor | None = None
        self._last_cos_sin: tuple[torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        self._build(max_positions)

    def _build(self, n: int) -> None:
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * self.attention_factor, persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x of shape [tokens, heads, head_dim] at the given positions."""
        cos, sin = self.cos_sin(positions)
        fused = fused_ops_kernel() if positions.device.type == "cpu" else None
        if fused is not None:   # cos/sin [T, 1, rot_dim] are contiguous rows of the tables
            outs = tuple(fused.rotary(x, cos.squeeze(1), sin.squeeze(1)) for x in xs)
            if all(o is not None for o in outs):
                return outs
        return tuple(_apply_rotary(x, cos, sin, self.rot_dim) for x in xs)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin table rows of `positions`, each [T, 1, rot_dim]."""
        # every layer of a step passes the same positions tensor: look the tables up once per step
        # (the reference held here keeps that tensor alive, so `is` cannot match a new one)
        if self._last_positions is not positions:
            self._last_positions = positions
            self._last_cos_sin = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        return self._last_cos_sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rot_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
