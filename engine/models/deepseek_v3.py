"""DeepSeek-V3 / R1 and Kimi-K2: multi-head latent attention (mla.py) and MoE with shared experts and
sigmoid grouped top-k routing (moe.py); the first `first_k_dense_replace` layers keep a dense MLP.

The paged cache holds only the compressed latent and the rope key per token and layer:
`kv_token_shape = (kv_lora_rank + qk_rope_head_dim,)`, the same on every TP rank. Built with `mtp=True`
the model also holds the checkpoint's multi-token-prediction layer (`DeepseekV3MTP`), whose KV is one
more layer of the same cache blocks.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, split_evenly
from ..layers.attention import AttentionMetadata
from ..layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from ..layers.mla import MLARotaryEmbedding, mla_attention, mla_softmax_scale
from ..layers.moe import Experts, Gate, expert_targets, grouped_topk
from ..layers.norm import RMSNorm
from ..layers.quant import QuantConfig
from ..weight_loader import Target, stacked_target
from .causal_lm import CausalLM, DecoderModel
from .llama import LlamaMLP, rope_parameters


class DeepseekV3Attention(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: MLARotaryEmbedding, quant: QuantConfig,
                 prefix: str) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        self.num_heads = split_evenly(total_heads, "attention heads").size
        self.layer = layer
        self.nope = cfg["qk_nope_head_dim"]
        self.rope = cfg["qk_rope_head_dim"]
        self.v_dim = cfg["v_head_dim"]
        self.kv_lora_rank = cfg["kv_lora_rank"]
        self.q_lora_rank = cfg.get("q_lora_rank")
        qk_dim = self.nope + self.rope
        bias = bool(cfg.get("attention_bias", False))
        eps = cfg.get("rms_norm_eps", 1e-6)
        method = lambda name: quant.linear_method([f"{prefix}.{name}"])  # noqa: E731
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias, method("q_a_proj"))
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_heads * qk_dim,
                                                 method=method("q_b_proj"))
        else:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * qk_dim, method=method("q_proj"))
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope, bias,
                                                   method("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank,
                                              total_heads * (self.nope + self.v_dim),
                                              method=method("kv_b_proj"))
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden, bias, method("o_proj"))
        self.rotary = rotary
        self.scale = mla_softmax_scale(qk_dim, rope_parameters(cfg))

    def after_load(self) -> None:
        """Split kv_b_proj per head into the key/value up-projections that mla_attention applies to
        the latent (views of the weight when it is dense, a dequantized copy when quantized)."""
        w = self.kv_b_proj.dense_weight().to(self.kv_a_layernorm.weight.dtype)
        w = w.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_kc, self.w_vc = w[:, : self.nope], w[:, self.nope:]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(t, self.num_heads, -1).split((self.nope, self.rope), dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope), dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe)
        o = mla_attention(q_nope, q_pe, latent, k_pe, kv_cache, self.layer, meta, self.scale,
                          self.w_kc, self.w_vc)
        return self.o_proj(o.reshape(t, self.num_heads * self.v_dim))


class DeepseekV3MoE(nn.Module):
    """Routed experts (grouped top-k) plus always-on shared experts, summed, one all-reduce."""

    def __init__(self, cfg: dict, quant: QuantConfig, prefix: str) -> None:
        super().__init__()
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise NotImplementedError("DeepSeek MoE: only sigmoid scoring (V3/R1/Kimi-K2)")
        num_experts = cfg["n_routed_experts"]
        hidden = cfg["hidden_size"]
        self.top_k = cfg["num_experts_per_tok"]
        self.num_groups = cfg.get("n_group") or 1
        self.topk_groups = cfg.get("topk_group") or 1
        self.renormalize = bool(cfg.get("norm_topk_prob", True))
        self.scaling = float(cfg.get("routed_scaling_factor", 1.0))
        self.gate = Gate(num_experts, hidden, correction_bias=True)
        self.experts = Experts(num_experts, hidden, cfg["moe_intermediate_size"], quant,
                               f"{prefix}.experts")
        shared = cfg.get("n_shared_experts") or 0
        self.shared_experts = (LlamaMLP(hidden, cfg["moe_intermediate_size"] * shared, quant,
                                        f"{prefix}.shared_experts", reduce_results=False)
                               if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = grouped_topk(logits, self.top_k, self.num_groups, self.topk_groups,
                                    self.renormalize, self.scaling,
                                    self.gate.e_score_correction_bias)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return all_reduce(y)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer: int, rotary: MLARotaryEmbedding, quant: QuantConfig) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}"
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = DeepseekV3Attention(cfg, layer, rotary, quant, f"{prefix}.self_attn")
        if cfg.get("n_routed_experts") and layer >= cfg.get("first_k_dense_replace", 0):
            self.mlp = DeepseekV3MoE(cfg, quant, f"{prefix}.mlp")
        else:
            self.mlp = LlamaMLP(hidden, cfg["intermediate_size"], quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions, x, kv_cache, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3MTP(nn.Module):
    """DeepSeek-V3's multi-token-prediction module (paper section 2.2), checkpoint layer
    `model.layers.{num_hidden_layers}`. At position i it combines the main model's hidden state h_i
    with the embedding of token i+1 and predicts token i+2:

        h' = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) -> decoder layer (MLA + MoE) -> h''
        logits = shared_head.head(shared_head.norm(h''))

    For a second draft it is fed its own h'' in place of h_i. Its attention KV is layer
    `num_hidden_layers` of the paged cache, at the main sequence's positions."""

    def __init__(self, cfg: dict, layer: int, rotary: MLARotaryEmbedding, quant: QuantConfig,
                 embed_tokens: VocabParallelEmbedding) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.enorm = RMSNorm(hidden, eps)
        self.hnorm = RMSNorm(hidden, eps)
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden, False,
                                        quant.linear_method([f"model.layers.{layer}.eh_proj"]))
        self.block = DeepseekV3DecoderLayer(cfg, layer, rotary, quant)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, eps)
        self.shared_head.head = ParallelLMHead(cfg["vocab_size"], hidden)
        # the main model's (a registered submodule, deduplicated in named_modules); replaced by the
        # checkpoint's own copy when that differs
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] (token i+1), hidden [T, H] (h_i), positions [T] (i); returns h'' [T, H]."""
        x = torch.cat((self.enorm(self.embed_tokens(input_ids)), self.hnorm(hidden)), dim=-1)
        return self.block(positions, self.eh_proj(x), kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(hidden)).float()


def deepseek_v3_model(cfg: dict, quant: QuantConfig) -> DecoderModel:
    rotary = _rotary(cfg)
    return DecoderModel(cfg, (DeepseekV3DecoderLayer(cfg, i, rotary, quant)
                              for i in range(cfg["num_hidden_layers"])))


def _rotary(cfg: dict) -> MLARotaryEmbedding:
    return MLARotaryEmbedding(cfg["qk_rope_head_dim"], rope_parameters(cfg),
                              cfg.get("max_position_embeddings", 4096),
                              bool(cfg.get("rope_interleave", True)))


_STACKED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# MTP tensors outside its decoder layer (checkpoint names after `model.layers.{n}.`)
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")


class DeepseekV3ForCausalLM(CausalLM):
    """With mtp=True (speculative_config method "mtp") the first MTP layer of the checkpoint is
    loaded as `self.mtp` and the cache has one layer more (`num_layers` counts it)."""

    supports_mtp = True

    def __init__(self, cfg: dict, mtp: bool = False) -> None:
        super().__init__(cfg)
        self.kv_token_shape = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],)
        self.num_hidden_layers = cfg["num_hidden_layers"]
        self.mtp: DeepseekV3MTP | None = None
        if mtp:
            if not cfg.get("num_nextn_predict_layers"):
                raise ValueError("speculative_config method 'mtp' needs a checkpoint with an MTP "
                                 "layer (num_nextn_predict_layers > 0); this one has none")
            self.mtp = DeepseekV3MTP(cfg, self.num_hidden_layers, _rotary(cfg), self.quant,
                                     self.model.embed_tokens)
            self.num_layers = self.num_hidden_layers + 1
        self._mtp_embed: torch.Tensor | None = None
        self._mtp_seen = False

    def build_model(self, cfg: dict) -> DecoderModel:
        return deepseek_v3_model(cfg, self.quant)

    def route(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[Target, torch.Tensor]]:
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.num_hidden_layers:
            # the multi-token-prediction layer(s): the first one when speculating with it
            if self.mtp is None or int(layer.group(1)) != self.num_hidden_layers:
                return ()
            rest = layer.group(2)
            self._mtp_seen = True
            if rest == "embed_tokens.weight":      # compared with the main one after loading
                self._mtp_embed = tensor
                return ()
            name = f"mtp.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.block.{rest}"
        if "rotary_emb" in name or (self.tie and name == "lm_head.weight"):
            return ()
        experts = expert_targets(name, tensor)
        return ((stacked_target(name, _STACKED), tensor),) if experts is None else experts

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        try:
            super().load_weights(weights)
        except ValueError as e:
            if self.mtp is not None and not self._mtp_seen:
                raise ValueError(f"speculative_config method 'mtp': the checkpoint has no MTP layer "
                                 f"(no model.layers.{self.num_hidden_layers}.* tensors)") from e
            raise
        own, self._mtp_embed = self._mtp_embed, None
        if self.mtp is None or own is None:
            return
        main = self.model.embed_tokens
        if not torch.equal(own[main.start:main.end].to(main.weight.dtype),
                           main.weight[:main.end - main.start]):
            self.mtp.embed_tokens = VocabParallelEmbedding(*own.shape).to(main.weight.device,
                                                                         main.weight.dtype)
            self.mtp.embed_tokens.load_shard("weight", own)
