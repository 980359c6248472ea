"""Model registry: HF `architectures` name -> model class.

Every model class takes the HF config dict, exposes `kv_token_shape` (per-token, per-layer KV
entry shape in the paged cache), `num_layers`, `forward(input_ids, positions, kv_cache, meta)`,
`compute_logits(hidden)` and `load_weights(iterable of (hf_name, tensor))`.
"""
from __future__ import annotations

import importlib

_REGISTRY: dict[str, tuple[str, str]] = {
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),   # also R1, Kimi-K2
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}


def model_class(config: dict):
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _REGISTRY:
            module, cls = _REGISTRY[arch]
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise ValueError(f"unsupported architecture {archs!r}; supported: {sorted(_REGISTRY)}")
