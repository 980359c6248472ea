"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2, Qwen3 dense) in plain torch.

One file, one model: q/k/v and gate/up projections are stacked into single matmuls; Qwen2 adds
q/k/v biases, Qwen3 adds per-head q/k RMSNorm.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdcluster.engine.attention import AttentionMetadata, paged_attention
from pdcluster.engine.layers import RMSNorm, RotaryEmbedding, silu_and_mul


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or hidden // self.num_heads
        self.layer = layer
        self.scale = self.head_dim ** -0.5
        model_type = cfg.get("model_type", "llama")
        bias = cfg.get("attention_bias", model_type == "qwen2")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6))
            self.k_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6))
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, self.layer, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, layer, rotary)
        self.mlp = LlamaMLP(cfg["hidden_size"], cfg["intermediate_size"])
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, positions, x, kv_cache, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rotary = RotaryEmbedding(head_dim, cfg.get("max_position_embeddings", 4096),
                                 cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary)
                                    for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids, positions, kv_cache, meta):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, kv_cache, meta)
        return self.norm(x)


# HF checkpoint names that we store stacked: (our param, hf name piece, shard index)
_STACKED = (
    ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.tie = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if self.tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        attn = self.model.layers[0].self_attn
        self.num_layers = cfg["num_hidden_layers"]
        self.kv_token_shape = (2, attn.num_kv_heads, attn.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _shard_sizes(self, param: str) -> list[int]:
        attn = self.model.layers[0].self_attn
        if param == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        inter = self.config["intermediate_size"]
        return [inter, inter]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if self.tie and name == "lm_head.weight":
                continue
            for stacked, piece, shard in _STACKED:
                if f".{piece}." in name:
                    target = name.replace(piece, stacked)
                    sizes = self._shard_sizes(stacked)
                    start = sum(sizes[:shard])
                    params[target].data[start:start + sizes[shard]].copy_(tensor)
                    loaded.add(f"{target}#{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                params[name].data.copy_(tensor)
                loaded.add(name)
        expected = {n for n, _ in self.named_parameters()}
        got = {n.split("#")[0] for n in loaded}
        missing = expected - got - ({"lm_head.weight"} if self.tie else set())
        if missing:
            raise ValueError(f"checkpoint is missing {sorted(missing)[:5]} ...")
