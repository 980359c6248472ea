"""Engine configuration: which model, where it runs, how big the paged KV cache is, and whether
decoding speculates."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Returns zero-filled memory for the KV cache: a 1-D uint8 tensor of at least the given number of
# bytes on the engine's device, which the engine views as its block-major cache. The store's
# shared-memory mode uses it so the cache lives where the node's store client can copy from.
KVAllocator = Callable[[int], "torch.Tensor"]

EMBEDDED_MODEL = "embedded"
SPEC_METHODS = ("ngram", "mtp")
NGRAM_ONLY = ("prompt_lookup_max", "prompt_lookup_min")
# EngineConfig.matmul_activations: "auto" and what it resolves to (layers/cpu_linear.py)
MATMUL_ACTIVATIONS = ("auto", "float32", "int16", "int8")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a drafter proposes up to `num_speculative_tokens` tokens per running
    sequence and one forward pass verifies them. "ngram" (prompt lookup) drafts the tokens that
    followed the longest earlier occurrence (prompt_lookup_max down to prompt_lookup_min tokens) of
    the sequence's own suffix; "mtp" runs the checkpoint's multi-token-prediction layer (DeepSeek-V3/R1
    with num_nextn_predict_layers > 0) autoregressively."""
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: unknown method {self.method!r}; "
                             f"known: {', '.join(SPEC_METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) "
                             f"exceeds prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpeculativeConfig:
        """The config from a plain mapping (LLM(...) keyword, cluster spec); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        ngram_only = sorted(set(data) & set(NGRAM_ONLY))
        if data.get("method") == "mtp" and ngram_only:
            raise ValueError(f"speculative_config: {ngram_only} apply to method 'ngram' only")
        return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    model: str = EMBEDDED_MODEL           # "embedded", a .gguf file, or an HF safetensors folder
    device: str = "auto"                  # auto | cpu | cuda | npu
    dtype: str = "auto"                   # auto (float32 on cpu, bfloat16 elsewhere) | float32 | bfloat16 | float16
    # the KV cache's element type: auto (the model's dtype) | float32 | bfloat16 | float16; a
    # half-width cache holds twice the tokens and halves what decode attention and a handoff move
    kv_cache_dtype: str = "auto"
    # what a layer whose weight is GGUF Q4_1/Q8_0 blocks multiplies its input as on the CPU:
    # "float32" (the dense model's arithmetic), or quantized per 32-wide block to "int16" (~2e-5
    # error per matmul) or "int8" (as llama.cpp does: ~0.6%, can change answers) and multiplied by
    # integer dot products, 1.2-2.3x faster here; "auto": int16 where the CPU has AVX512-VNNI, else
    # float32 (layers/cpu_linear.py)
    matmul_activations: str = "auto"
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
    # None: no speculation; a mapping is converted (LLM(speculative_config={...}))
    speculative_config: SpeculativeConfig | None = None
    # Salts the block hashes (prefix cache, store keys): a store that outlives a deployment never
    # serves its blocks to the next one. "" outside a cluster.
    deployment_id: str = ""

    def __post_init__(self) -> None:
        spec = self.speculative_config
        if isinstance(spec, Mapping):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(spec))
        elif spec is not None and not isinstance(spec, SpeculativeConfig):
            raise ValueError(f"speculative_config must be a mapping or SpeculativeConfig, got {spec!r}")
        if self.matmul_activations not in MATMUL_ACTIVATIONS:
            raise ValueError(f"matmul_activations must be one of {MATMUL_ACTIVATIONS}, got "
                             f"{self.matmul_activations!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be >= 2")
