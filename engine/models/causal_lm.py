"""What every model file shares: token embeddings, a stack of decoder layers and a final norm
(`DecoderModel`), under an LM head that may be tied to the embeddings (`CausalLM`)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layers.attention import AttentionMetadata
from ..layers.linear import ParallelLMHead, VocabParallelEmbedding
from ..layers.norm import RMSNorm
from ..layers.quant import QuantConfig
from ..weight_loader import Target, load_weights


class DecoderModel(nn.Module):
    def __init__(self, cfg: dict, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        # all layers of a decode step in one call, where the model qualifies (llama_decode_step.py)
        self.decode_layers = None

    def forward(self, input_ids, positions, kv_cache, meta):
        x = self.embed_tokens(input_ids)
        if self.decode_layers is not None and (
                out := self.decode_layers(x, positions, kv_cache, meta)) is not None:
            return self.norm(out)
        for layer in self.layers:
            x = layer(positions, x, kv_cache, meta)
        return self.norm(x)


class CausalLM(nn.Module):
    """A model: `build_model` makes its decoder; `route` maps checkpoint tensors onto it. Subclasses
    set `kv_token_shape`, the per-token, per-layer KV entry in the paged cache."""

    kv_token_shape: tuple[int, ...]

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = cfg
        self.quant = QuantConfig.from_hf(cfg)
        self.model = self.build_model(cfg)
        self.tie = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg["vocab_size"], cfg["hidden_size"],
                                      self.model.embed_tokens if self.tie else None)
        self.num_layers = cfg["num_hidden_layers"]

    def build_model(self, cfg: dict) -> DecoderModel:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def route(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[Target, torch.Tensor]]:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, self.route)
