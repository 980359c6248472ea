"""Paged attention over the block-major KV cache: the portable torch reference path."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cpu_kernels import fused_ops_kernel, paged_decode_kernel

# Cache layout (one tensor, see DESIGN "KV in the store"): `cache[num_blocks, num_layers, block_size,
# *token_shape]`; one block holds every layer's KV for `block_size` tokens contiguously, so it can be
# shipped to the store as one object. Fused device kernels (NPU/GPU) would replace `paged_attention`
# behind the same signature; none is verified on hardware here. On the CPU, decode reads the cache in
# place through cpu_kernels.py's compiled kernel when one could be built; this file's torch code is the
# reference for it.


@dataclass
class PrefillSegment:
    start: int               # first row of this sequence's tokens in the packed batch
    num_tokens: int          # tokens computed this step (a chunk of the prompt)
    context_len: int         # tokens with KV after this step (cached + this chunk)
    block_table: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs about one packed step; built once per step by the runner."""
    slot_blocks: torch.Tensor            # [T] block id of each new token
    slot_offsets: torch.Tensor           # [T] offset inside that block
    # the first num_decode tokens are decode rows: a token attending to the first decode_lens[i]
    # positions of its sequence (a one-token decode, or one position of a draft verification)
    num_decode: int
    decode_block_tables: torch.Tensor    # [num_decode, max_blocks]
    decode_mask: torch.Tensor            # [num_decode, 1, 1, max_blocks * block_size] True = attend
    decode_lens: torch.Tensor            # [num_decode] context length of each decode (its new token included)
    prefills: list[PrefillSegment] = field(default_factory=list)


def write_kv(cache: torch.Tensor, layer: int, kv: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store this step's per-token KV ([T, *token_shape]) into its cache slots."""
    nb, nl, bs = cache.shape[:3]
    slots = (meta.slot_blocks * nl + layer) * bs + meta.slot_offsets
    cache.view(nb * nl * bs, -1).index_copy_(0, slots, kv.reshape(kv.shape[0], -1).to(cache.dtype))


def gather_kv(cache: torch.Tensor, layer: int, block_table: torch.Tensor) -> torch.Tensor:
    """KV of the blocks in `block_table` ([..., nb]) flattened to tokens: [..., nb*bs, *token_shape].

    Rows of the [blocks*layers, block_size*entry] view are contiguous, so this is one memcpy-like
    index_select rather than a strided gather.
    """
    nb, nl, bs = cache.shape[:3]
    rows = cache.view(nb * nl, -1).index_select(0, (block_table * nl + layer).reshape(-1))
    return rows.view(*block_table.shape[:-1], block_table.shape[-1] * bs, *cache.shape[3:])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Multi-head / grouped-query attention. q: [T, H, d]; k, v: [T, KVH, d]; returns [T, H, d].

    Writes k/v into the cache first, then attends each sequence over its whole context.
    """
    fused = fused_ops_kernel() if cache.device.type == "cpu" else None
    if fused is None or not fused.write_kv(cache, layer, k, v, meta.slot_blocks, meta.slot_offsets):
        write_kv(cache, layer, torch.stack((k, v), dim=1), meta)
    nd = meta.num_decode
    kernel = paged_decode_kernel() if nd and q.device.type == "cpu" else None
    if kernel is not None and nd == q.shape[0] and kernel.supports(q, cache):   # decodes only
        return kernel(q, cache, layer, meta.decode_block_tables, meta.decode_lens, scale)
    out = torch.empty_like(q)
    if kernel is not None and kernel.supports(q, cache):
        out[:nd] = kernel(q[:nd], cache, layer, meta.decode_block_tables, meta.decode_lens, scale)
    elif nd:
        kv = gather_kv(cache, layer, meta.decode_block_tables).to(q.dtype)  # [B, L, 2, KVH, d]
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
            attn_mask=meta.decode_mask, scale=scale, enable_gqa=True).squeeze(2)
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.num_tokens)
        qs = q[rows].transpose(0, 1)
        if seg.context_len == seg.num_tokens:      # fresh prompt: this step's k/v are the context
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:                                       # continuing chunk or prefix-cache hit
            kv = gather_kv(cache, layer, seg.block_table)[: seg.context_len].to(q.dtype)
            ks, vs = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_mask(seg, q.device),
                                               scale=scale, enable_gqa=True)
        out[rows] = o.transpose(0, 1)
    return out


def causal_mask(seg: PrefillSegment, device: torch.device) -> torch.Tensor:
    """[n, ctx] mask: query i (at position ctx-n+i) sees keys 0..ctx-n+i."""
    first = seg.context_len - seg.num_tokens
    q_pos = torch.arange(first, seg.context_len, device=device)[:, None]
    return torch.arange(seg.context_len, device=device)[None, :] <= q_pos
