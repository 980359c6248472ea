"""The KV handoff's block checksums (`engine/kv_handoff.block_checksum`, zlib-ng's CRC-32) against the
Python standard library's zlib computing the same CRC-32 over the same bytes, in one run.

    python -m pdcluster.cluster.tools.bench_checksum [--tokens 2044] [--rounds 7]

Each side checksums every block of one prompt's KV, as prefill's export and decode's load do (the last
block partial); the rounds alternate the two sides, and every round checks that both give the same
checksums.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib

import torch

from ...engine.kv_handoff import block_checksum

BLOCK_SIZE = 16
# [num_layers, K+V, num_kv_heads, head_dim] of the embedded SmolLM2, float32: 737,280 bytes a block
SMOLLM2_TOKEN_SHAPE = (30, 2, 3, 64)


def stdlib_checksum(block: torch.Tensor, num_tokens: int) -> int:
    """The same CRC-32 as `block_checksum`, computed the same way, with the standard library's zlib."""
    if num_tokens == block.shape[1]:
        return zlib.crc32(memoryview(block.view(torch.uint8).numpy()))
    crc = 0
    for layer in block[:, :num_tokens]:
        crc = zlib.crc32(memoryview(layer.view(torch.uint8).numpy()), crc)
    return crc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2044, help="prompt length (the last block partial)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    layers, *token_shape = SMOLLM2_TOKEN_SHAPE
    num_blocks = -(-args.tokens // BLOCK_SIZE)
    cache = torch.randn(num_blocks, layers, BLOCK_SIZE, *token_shape)
    counts = [min(BLOCK_SIZE, args.tokens - b * BLOCK_SIZE) for b in range(num_blocks)]
    nbytes = sum(n * cache[0, 0, 0].numel() * cache.element_size() * layers for n in counts)

    def timed(fn) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        sums = [fn(cache[b], n) for b, n in enumerate(counts)]
        return time.perf_counter() - t0, sums

    ours, stdlib = [], []
    for _ in range(args.rounds):
        t_ours, s_ours = timed(block_checksum)
        t_std, s_std = timed(stdlib_checksum)
        if s_ours != s_std:
            raise SystemExit("the two checksums differ")
        ours.append(t_ours)
        stdlib.append(t_std)
    med_ours, med_std = statistics.median(ours), statistics.median(stdlib)
    ratios = sorted(s / o for o, s in zip(ours, stdlib))
    print(f"{args.tokens}-token prompt, SmolLM2 float32 KV: {num_blocks} blocks, {nbytes / 1e6:.1f} MB; "
          f"median of {args.rounds} rounds")
    print("| checksum | ms per prompt | GB/s |")
    print("|---|---|---|")
    print(f"| zlib-ng (block_checksum) | {med_ours * 1e3:.1f} | {nbytes / med_ours / 1e9:.2f} |")
    print(f"| stdlib zlib | {med_std * 1e3:.1f} | {nbytes / med_std / 1e9:.2f} |")
    print(f"speedup {med_std / med_ours:.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x); identical checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
