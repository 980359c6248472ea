"""Mixture of experts: routing (softmax top-k; DeepSeek-V3's sigmoid grouped top-k with correction
bias) and the routed experts, in portable torch.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from ..weight_loader import Target
from .activation import silu_and_mul
from .linear import ColumnParallelLinear, RowParallelLinear
from .quant import QuantConfig

# `Experts.forward` is the reference a fused MoE kernel would replace behind the same signature.
# Under tensor parallelism every expert's intermediate features are split over the ranks (column
# gate/up, row down) and the caller sums the partial outputs with one all-reduce.


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen/Mixtral routing: softmax (float32) over all experts, keep the top k. Returns
    (weights [T, k] float32, expert ids [T, k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(logits: torch.Tensor, top_k: int, num_groups: int, topk_groups: int,
                 renormalize: bool, scaling: float,
                 correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing ("noaux_tc"): sigmoid scores; the correction bias only steers the choice;
    experts come from the `topk_groups` groups with the best top-2 score sums; the chosen experts'
    unbiased scores are renormalized (optionally) and scaled by the routed scaling factor."""
    scores = logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    t, e = choice.shape
    if num_groups > 1:
        group_scores = choice.view(t, num_groups, e // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
        best = group_scores.topk(topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class Gate(nn.Module):
    """Router weights [experts, hidden], never quantized, replicated on every rank; DeepSeek-V3 adds
    a float32 per-expert score correction bias."""

    def __init__(self, num_experts: int, hidden: int, correction_bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias else None)


class Experts(nn.Module):
    """The routed experts' stacked weights: w13 = [gate; up] per expert, w2 = down."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, quant: QuantConfig,
                 prefix: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        # one method for all: checkpoints quantize every expert projection alike (checked on expert 0)
        method = quant.linear_method([f"{prefix}.0.{p}_proj" for p in ("gate", "up", "down")])
        self.w13 = ColumnParallelLinear(hidden, [intermediate, intermediate], method=method,
                                        num_experts=num_experts)
        self.w2 = RowParallelLinear(intermediate, hidden, method=method, num_experts=num_experts,
                                    reduce_results=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights/ids [T, k]. Returns sum_k weight * expert(x), this rank's partial sum."""
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():     # ascending, like transformers: same float sums
            tok, slot = torch.where(ids == e)
            h = self.w2.apply_expert(e, silu_and_mul(self.w13.apply_expert(e, x[tok])))
            out.index_add_(0, tok, (h * weights[tok, slot, None]).to(out.dtype))
        return out


_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)")
_FUSED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")
_PIECE = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}


def expert_targets(name: str, tensor: torch.Tensor) -> list[tuple[Target, torch.Tensor]] | None:
    """Where an expert tensor goes: per-expert names as DeepSeek/Qwen3-MoE checkpoints ship them
    (`...experts.7.gate_proj.qweight`), or transformers' fused 3D `experts.gate_up_proj` [E, 2I, H]
    / `experts.down_proj` [E, H, I]. None if `name` is not an expert tensor."""
    m = _PER_EXPERT.fullmatch(name)
    if m:
        module, shard = _PIECE[m.group(3)]
        return [(Target(f"{m.group(1)}.{module}", m.group(4), shard, int(m.group(2))), tensor)]
    m = _FUSED.fullmatch(name)
    if m is None:
        return None
    if m.group(2) == "down_proj":
        return [(Target(f"{m.group(1)}.w2", "weight", 0, e), tensor[e]) for e in range(len(tensor))]
    return list(_fused_gate_up(m.group(1), tensor))


def _fused_gate_up(prefix: str, tensor: torch.Tensor) -> Iterator[tuple[Target, torch.Tensor]]:
    for e, both in enumerate(tensor):
        gate, up = both.chunk(2, dim=0)
        yield Target(f"{prefix}.w13", "weight", 0, e), gate
        yield Target(f"{prefix}.w13", "weight", 1, e), up

