"""Engine configuration: which model, where it runs, and how big the paged KV cache is."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Returns zero-filled memory for the KV cache: a 1-D uint8 tensor of at least the given number of
# bytes on the engine's device, which the engine views as its block-major cache. The store's
# shared-memory mode uses it so the cache lives where the node's store client can copy from.
KVAllocator = Callable[[int], "torch.Tensor"]

EMBEDDED_MODEL = "embedded"


@dataclass(frozen=True)
class EngineConfig:
    model: str = EMBEDDED_MODEL           # "embedded", a .gguf file, or an HF safetensors folder
    device: str = "auto"                  # auto | cpu | cuda | npu
    dtype: str = "auto"                   # auto (float32 on cpu, bfloat16 elsewhere) | float32 | bfloat16 | float16
    block_size: int = 16
    num_kv_blocks: int | None = None      # None: derived from kv_cache_gib
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512     # token budget per step (chunked prefill)
    max_model_len: int | None = None      # None: the model's own limit, capped at 8192
    enable_prefix_caching: bool = True
    # KV handoffs and store prefix hits move on a transfer thread while the batch keeps stepping;
    # False moves them inside the step (every running sequence waits), the old path, kept to compare
    async_kv_transfer: bool = True
    threads: int | None = None            # torch intra-op threads on cpu
    tp_rank: int = 0
    tp_size: int = 1
    # a TP collective (or the rendezvous) waiting longer than this raises: a hung or dead peer rank
    # fails the engine instead of blocking it forever
    tp_timeout_s: float = 120.0
    kv_allocator: KVAllocator | None = field(default=None, compare=False, repr=False)  # None: torch.zeros

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be >= 2")
