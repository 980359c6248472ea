"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2, Qwen3 dense) in plain torch.

One file, one model: q/k/v and gate/up projections are stacked into single matmuls; Qwen2 adds
q/k/v biases, Qwen3 adds per-head q/k RMSNorm. Linears are tensor-parallel and may be quantized
(parallel.py, quant.py); Qwen3-MoE reuses this decoder with its own MLP (`make_mlp`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..layers.activation import silu_and_mul
from ..layers.attention import AttentionMetadata, paged_attention
from ..layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.quant import QuantConfig
from ..layers.rotary import RotaryEmbedding
from ..weight_loader import Target, stacked_target
from .causal_lm import CausalLM, DecoderModel


def rope_parameters(cfg: dict) -> dict:
    """RoPE settings in transformers 5 form (rope_type, rope_theta, scaling keys), whether the
    config spells them `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type") or "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: RotaryEmbedding, quant: QuantConfig,
                 prefix: str) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv_heads = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        self.layer = layer
        self.scale = self.head_dim ** -0.5
        model_type = cfg.get("model_type", "llama")
        bias = cfg.get("attention_bias", model_type == "qwen2")
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, total_heads, total_kv_heads, bias,
            quant.linear_method([f"{prefix}.{p}_proj" for p in "qkv"]))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=False,
                                        method=quant.linear_method([f"{prefix}.o_proj"]))
        self.qk_norm = model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6))
            self.k_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6))
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kvh, self.head_dim)
        v = qkv[:, h + kvh:]
        if self.qk_norm:
            q, k = self.rotary(positions, self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h:h + kvh]))
        else:  # q and k heads are adjacent: rotate them in one pass
            (qk,) = self.rotary(positions, qkv[:, :h + kvh])
            q, k = qk[:, :h], qk[:, h:]
        o = paged_attention(q, k, v, kv_cache, self.layer, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    """Gated SiLU MLP; under TP the intermediate features are split. reduce_results=False leaves the
    all-reduce to a caller that sums this with other partial outputs (DeepSeek's shared experts)."""

    def __init__(self, hidden: int, intermediate: int, quant: QuantConfig, prefix: str,
                 reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden, [intermediate, intermediate],
            method=quant.linear_method([f"{prefix}.gate_proj", f"{prefix}.up_proj"]))
        self.down_proj = RowParallelLinear(intermediate, hidden,
                                           method=quant.linear_method([f"{prefix}.down_proj"]),
                                           reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: RotaryEmbedding, quant: QuantConfig,
                 mlp: nn.Module) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, layer, rotary, quant, f"model.layers.{layer}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, positions, x, kv_cache, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


def llama_model(cfg: dict, quant: QuantConfig, make_mlp: Callable[[int, str], nn.Module]) -> DecoderModel:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = rope_parameters(cfg)
    rotary = RotaryEmbedding(head_dim, cfg.get("max_position_embeddings", 4096),
                             rope["rope_theta"], None if rope["rope_type"] == "default" else rope)
    return DecoderModel(cfg, (LlamaDecoderLayer(cfg, i, rotary, quant, make_mlp(i, f"model.layers.{i}.mlp"))
                              for i in range(cfg["num_hidden_layers"])))


# HF checkpoint module names that we store stacked: hf name -> (our module, shard index)
STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        attn = self.model.layers[0].self_attn
        self.kv_token_shape = (2, attn.num_kv_heads, attn.head_dim)

    def build_model(self, cfg: dict) -> DecoderModel:
        return llama_model(cfg, self.quant, self.make_mlp)

    def make_mlp(self, layer: int, prefix: str) -> nn.Module:
        return LlamaMLP(self.config["hidden_size"], self.config["intermediate_size"], self.quant,
                        prefix)

    def route(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[Target, torch.Tensor]]:
        """Checkpoint tensor -> where it goes (nothing for recomputed or tied tensors)."""
        if "rotary_emb" in name or (self.tie and name == "lm_head.weight"):
            return ()
        return ((stacked_target(name, STACKED), tensor),)
