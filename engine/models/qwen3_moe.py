"""Qwen3-MoE: the Qwen3 decoder (q/k RMSNorm, GQA) with sparse MoE MLPs (softmax top-k routing, no
shared experts); layers in `mlp_only_layers` or off the `decoder_sparse_step` keep a dense MLP."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce
from ..layers.moe import Experts, Gate, expert_targets, softmax_topk
from ..layers.quant import QuantConfig
from ..weight_loader import Target
from .llama import LlamaForCausalLM, LlamaMLP


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: dict, num_experts: int, quant: QuantConfig, prefix: str) -> None:
        super().__init__()
        self.top_k = cfg["num_experts_per_tok"]
        self.renormalize = bool(cfg.get("norm_topk_prob", False))
        self.gate = Gate(num_experts, cfg["hidden_size"])
        self.experts = Experts(num_experts, cfg["hidden_size"], cfg["moe_intermediate_size"], quant,
                               f"{prefix}.experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.gate.weight)
        weights, ids = softmax_topk(logits, self.top_k, self.renormalize)
        return all_reduce(self.experts(x, weights.to(x.dtype), ids))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def make_mlp(self, layer: int, prefix: str) -> nn.Module:
        cfg = self.config
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        sparse = (layer not in (cfg.get("mlp_only_layers") or []) and num_experts > 0
                  and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)
        if sparse:
            return Qwen3MoeSparseMoeBlock(cfg, num_experts, self.quant, prefix)
        return LlamaMLP(cfg["hidden_size"], cfg["intermediate_size"], self.quant, prefix)

    def route(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[Target, torch.Tensor]]:
        experts = expert_targets(name, tensor)
        return super().route(name, tensor) if experts is None else experts
