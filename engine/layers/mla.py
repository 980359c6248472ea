"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over the paged cache, plus its RoPE (YaRN)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, causal_mask, gather_kv, write_kv

# The cache holds, per token and layer, only the compressed latent (kv_lora_rank, after its RMSNorm)
# and the rotated rope key (qk_rope_head_dim): `kv_token_shape = (kv_lora_rank + qk_rope_head_dim,)`,
# shared by all heads and all TP ranks. Prefill expands the latent to per-head keys/values with
# kv_b_proj; decode absorbs kv_b_proj into the query and output instead ("weight absorption"), so it
# attends over the cached latents directly, as one-kv-head attention of width kv_lora_rank + rope.


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  k_pe: torch.Tensor, cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                  scale: float, w_kc: torch.Tensor, w_vc: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, N] and rotated q_pe [T, H, R]; this step's normed latent [T, L] and rotated
    k_pe [T, R]; kv_b_proj split per head into w_kc [H, N, L] (keys) and w_vc [H, V, L] (values).
    Writes latent|k_pe into the cache, returns the attention output [T, H, V]."""
    write_kv(cache, layer, torch.cat((latent, k_pe), dim=-1), meta)
    t, h, _ = q_nope.shape
    rank = latent.shape[-1]
    out = q_nope.new_empty(t, h, w_vc.shape[1])
    nd = meta.num_decode
    if nd:
        entries = gather_kv(cache, layer, meta.decode_block_tables).to(q_nope.dtype)  # [B, S, L+R]
        # q_nope . (W_kc c) == (W_kc^T q_nope) . c: score the latents without expanding them
        q_latent = torch.einsum("bhn,hnl->bhl", q_nope[:nd], w_kc)
        q = torch.cat((q_latent, q_pe[:nd]), dim=-1).unsqueeze(2)            # [B, H, 1, L+R]
        o_latent = F.scaled_dot_product_attention(
            q, entries.unsqueeze(1), entries[..., :rank].unsqueeze(1), attn_mask=meta.decode_mask,
            scale=scale, enable_gqa=True).squeeze(2)                          # [B, H, L]
        out[:nd] = torch.einsum("bhl,hvl->bhv", o_latent, w_vc)
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.num_tokens)
        mask = None
        if seg.context_len == seg.num_tokens:      # fresh prompt: this step's latents are the context
            c, kp = latent[rows], k_pe[rows]
        else:                                       # continuing chunk or prefix-cache hit
            entries = gather_kv(cache, layer, seg.block_table)[: seg.context_len].to(q_nope.dtype)
            c, kp = entries[:, :rank], entries[:, rank:]
            mask = causal_mask(seg, q_nope.device)
        k_nope = torch.einsum("sl,hnl->hsn", c, w_kc)
        v = torch.einsum("sl,hvl->hsv", c, w_vc)
        k = torch.cat((k_nope, kp.unsqueeze(0).expand(h, -1, -1)), dim=-1)
        q = torch.cat((q_nope[rows], q_pe[rows]), dim=-1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale)
        out[rows] = o.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------- rope

def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, params: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin attention factor, as transformers computes them."""
    base = params["rope_theta"]
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def mla_softmax_scale(qk_head_dim: int, params: dict) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context fix)."""
    scale = qk_head_dim ** -0.5
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


class MLARotaryEmbedding(nn.Module):
    """RoPE over the rope part of q ([T, H, R]) and the shared k_pe ([T, R]).

    `interleave` (DeepSeek's layout, transformers' rope_interleave): dims (2i, 2i+1) form pair i.
    The result is laid out like transformers' (pairs' first elements, then second ones), so q.k
    matches it exactly; cos/sin are computed per step from the positions (no length-sized table).
    """

    def __init__(self, dim: int, params: dict, max_positions: int, interleave: bool) -> None:
        super().__init__()
        kind = params.get("rope_type", "default")
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.attention_factor = 1.0
        if kind == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(dim, params, max_positions)
        elif kind != "default":
            raise NotImplementedError(f"rope scaling {kind!r} is not supported for MLA (yarn, default)")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = interleave

    def forward(self, positions: torch.Tensor, q_pe: torch.Tensor,
                k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return (self._rotate(q_pe, cos.unsqueeze(1), sin.unsqueeze(1)),
                self._rotate(k_pe, cos, sin))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
