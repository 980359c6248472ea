"""GGUF blocks regrouped 16 weight rows at a time, as the integer-activation matmul reads them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_quant import QBLOCK, BlockWeights

# With `matmul_activations` int16 or int8 a layer's input is quantized to integers per 32-wide block
# and each block of a weight row is multiplied by integer dot products (csrc/integer_block_linear.c,
# whose header has the layouts). An AVX512-VNNI dot product takes four consecutive codes of 16 weight
# rows, so `interleave` stores the codes of 16 rows side by side, four by four, block after block
# (Q8_0's codes offset by 128 to unsigned bytes), and each block's scales (and Q4_1 minimums) for the
# 16 rows in one vector; both widths read this one layout. Rows past N are zero and never stored. The
# codes and scales are the ones `block_quant.pack_exact` recovered: the weights are exactly the dense
# model's, only x is rounded.

GROUP = 16


@dataclass(frozen=True)
class InterleavedBlocks:
    qtype: str                     # "q4_1" | "q8_0"
    qs: torch.Tensor               # [groups, K/32, 256 (q4_1) | 512 (q8_0)] uint8
    d: torch.Tensor                # [groups, K/32, 16] float32
    m: torch.Tensor | None         # q4_1's minimums, as d
    n: int                         # rows of W (y = x W^T, W [n, k])
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def _by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, nb, ...] -> [groups, 16, nb, ...], rows past N zero."""
    pad = groups * GROUP - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.reshape(groups, GROUP, *t.shape[1:])


def interleave(bw: BlockWeights) -> InterleavedBlocks:
    """`bw`'s codes and scales in the integer kernel's layout."""
    n, k = bw.shape
    nb, groups = k // QBLOCK, -(-n // GROUP)
    if bw.qtype == "q4_1":
        codes = torch.cat([bw.qs & 0x0F, bw.qs >> 4], dim=-1)                  # [N, nb, 32]
        # [G, 16 rows, nb, 4 pairs, 2 halves, 4] -> [G, nb, pair, row, 4]: low nibble the pair's
        # first four codes, high nibble its next four
        c = _by_group(codes, groups).reshape(groups, GROUP, nb, 4, 2, 4)
        packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
        qs = packed.reshape(groups, nb, GROUP * QBLOCK // 2)
    elif bw.qtype == "q8_0":
        codes = (bw.qs.to(torch.int16) + 128).to(torch.uint8)                 # [N, nb, 32]
        c = _by_group(codes, groups).reshape(groups, GROUP, nb, 8, 4)
        qs = c.permute(0, 2, 3, 1, 4).reshape(groups, nb, GROUP * QBLOCK)
    else:
        raise ValueError(f"unknown block format {bw.qtype!r}")
    scales = lambda t: _by_group(t, groups).permute(0, 2, 1).contiguous()  # noqa: E731
    return InterleavedBlocks(bw.qtype, qs.contiguous(), scales(bw.d),
                             scales(bw.m) if bw.m is not None else None, n, k)


def deinterleave(ib: InterleavedBlocks) -> BlockWeights:
    """`interleave`'s inverse: the blocks row by row (block_quant's layout)."""
    groups, nb = ib.qs.shape[:2]
    if ib.qtype == "q4_1":
        packed = ib.qs.reshape(groups, nb, 4, GROUP, 4).permute(0, 3, 1, 2, 4)   # [G, row, nb, pair, 4]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-2).reshape(groups * GROUP, nb, QBLOCK)
        qs = codes[:, :, : QBLOCK // 2] | (codes[:, :, QBLOCK // 2:] << 4)
    else:
        c = ib.qs.reshape(groups, nb, 8, GROUP, 4).permute(0, 3, 1, 2, 4)
        qs = (c.reshape(groups * GROUP, nb, QBLOCK).to(torch.int16) - 128).to(torch.int8)
    rows = lambda t: t.permute(0, 2, 1).reshape(groups * GROUP, nb)[: ib.n].contiguous()  # noqa: E731
    return BlockWeights(ib.qtype, qs[: ib.n].contiguous(), rows(ib.d),
                        rows(ib.m) if ib.m is not None else None)
