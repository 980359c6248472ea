"""GGUF block quantization (Q4_1, Q8_0), recovered losslessly from a dense weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The GGUF loader dequantizes every tensor (weights.py), and the model stacks and slices those dense
# tensors like any other checkpoint's. A CPU decode step, though, is bound by streaming the weights'
# bytes, so the matmul kernel (csrc/block_linear.c) wants them back in 32-wide blocks. `pack_exact`
# finds, for each block of a layer's dense weight, the fp16 scale (and Q4_1 minimum) and integer codes
# that reproduce it *bit for bit* by gguf's own dequantization, or returns None. So a layer is only
# ever multiplied by exactly the weights the dense model holds, whatever stacking or tensor-parallel
# slicing made them, and a weight that did not come from such blocks simply stays dense.
#
# Formats (row n of W [N, K], block b = weights 32b .. 32b + 31 of it):
#   q4_1: qs [N, K/32, 16] uint8 (code i in the low nibble of byte i, code 16 + i in the high), d and
#         m [N, K/32] float32; w = fl(d * q) + m
#   q8_0: qs [N, K/32, 32] int8, d [N, K/32] float32; w = d * q

QBLOCK = 32
_FP16_MAX_BITS = 0x7BFF   # largest finite fp16
_SEARCH = (0, -1, 1, -2, 2)   # fp16 ulps around the estimated scale, nearest first
_CHUNK = 1 << 18              # weights searched at once


@dataclass(frozen=True)
class BlockWeights:
    qtype: str                     # "q4_1" | "q8_0"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None         # q4_1's per-block minimum

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QBLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def dequantize(bw: BlockWeights) -> torch.Tensor:
    """The float32 [N, K] weight the blocks encode (gguf's arithmetic: product rounded, then +m)."""
    n, k = bw.shape
    if bw.qtype == "q4_1":
        q = torch.cat([bw.qs & 0x0F, bw.qs >> 4], dim=-1).float()
        w = (bw.d.unsqueeze(-1) * q) + bw.m.unsqueeze(-1)
    elif bw.qtype == "q8_0":
        w = bw.d.unsqueeze(-1) * bw.qs.float()
    else:
        raise ValueError(f"unknown block format {bw.qtype!r}")
    return w.reshape(n, k)


def pack_exact(w: torch.Tensor) -> BlockWeights | None:
    """Blocks that dequantize to exactly `w` (Q4_1 tried first, then Q8_0), or None."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % QBLOCK or w.numel() == 0:
        return None
    blocks = w.detach().reshape(w.shape[0], -1, QBLOCK).contiguous()
    for pack in (_pack_q4_1, _pack_q8_0):
        if pack(blocks[:1]) is None:          # one row first: a weight of another kind fails fast
            continue
        # about 1 MiB of weights at a time: the search's temporaries stay small and cache-resident
        step = max(1, _CHUNK // w.shape[1])
        parts = [pack(blocks[i:i + step]) for i in range(0, len(blocks), step)]
        if any(p is None for p in parts):
            continue
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return BlockWeights(parts[0].qtype, cat("qs"), cat("d"),
                            cat("m") if parts[0].m is not None else None)
    return None


def _fp16_near(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """The non-negative fp16 value `ulps` steps from fp16(x) (x >= 0), as float32."""
    bits = x.to(torch.float16).view(torch.int16).to(torch.int32) + ulps
    return bits.clamp(0, _FP16_MAX_BITS).to(torch.int16).view(torch.float16).float()


def _search(blocks: torch.Tensor, estimate: torch.Tensor, lo: int, hi: int,
            m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per block, the first fp16 scale d near `estimate` whose codes q in [lo, hi] give back the
    block exactly as fl(d * q) (+ m). None if some block has none."""
    codes = torch.zeros(blocks.shape, dtype=torch.int32)
    scales = torch.zeros(blocks.shape[:2])
    todo = torch.ones(blocks.shape[:2], dtype=torch.bool)
    for ulps in _SEARCH:
        idx = todo.nonzero(as_tuple=True)
        if idx[0].numel() == 0:
            break
        x = blocks[idx]
        offset = m[idx].unsqueeze(-1) if m is not None else 0.0
        d = _fp16_near(estimate[idx], ulps).unsqueeze(-1)
        # a zero scale (a constant block, or fp16 underflow) gives -0.0 where gguf's code is negative
        zero_code = torch.where(torch.signbit(x), -1.0, 0.0) if lo < 0 else 0.0
        q = torch.where(d > 0, torch.round((x - offset) / torch.where(d > 0, d, 1)),
                        zero_code).clamp(lo, hi)
        # bit for bit (so -0.0 != 0.0), with gguf's numpy arithmetic: the product rounded, then +m
        rebuilt = d * q if m is None else (d * q) + offset   # (+0.0 would turn -0.0 into 0.0)
        ok = (rebuilt.view(torch.int32) == x.view(torch.int32)).all(-1)
        hit = tuple(i[ok] for i in idx)
        codes[hit] = q[ok].to(torch.int32)
        scales[hit] = d[ok].squeeze(-1)
        todo[hit] = False
    return None if todo.any() else (scales, codes)


def _pack_q4_1(blocks: torch.Tensor) -> BlockWeights | None:
    # gguf's quantizer gives a block's smallest weight code 0, so that weight *is* the fp16 minimum
    m = blocks.amin(-1)
    if not torch.equal(m.to(torch.float16).float(), m):
        return None
    found = _search(blocks, (blocks.amax(-1) - m) / 15, 0, 15, m)
    if found is None:
        return None
    d, q = found
    q = q.to(torch.uint8)
    qs = q[..., : QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)
    return BlockWeights("q4_1", qs.contiguous(), d.contiguous(), m.contiguous())


def _pack_q8_0(blocks: torch.Tensor) -> BlockWeights | None:
    found = _search(blocks, blocks.abs().amax(-1) / 127, -128, 127, None)
    if found is None:
        return None
    d, q = found
    return BlockWeights("q8_0", q.to(torch.int8).contiguous(), d.contiguous(), None)
