"""Tokenizer and chat template from the model's own files (GGUF metadata or an HF folder).

Backed by `transformers`' tokenizers, so `apply_chat_template` has exactly its semantics.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, path: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for a hub
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        if path.is_file():
            self._tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            self._tok = AutoTokenizer.from_pretrained(str(path))
        self.eos_token_ids: frozenset[int] = frozenset(
            t for t in (self._tok.eos_token_id,) if t is not None)
        self.vocab_size = len(self._tok)

    @property
    def hf(self):
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):   # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
