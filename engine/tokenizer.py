"""Tokenizer and chat template from the model's own files (GGUF metadata or an HF folder).

Backed by `transformers`' tokenizers, so `apply_chat_template` has exactly its semantics, with one
exception: text in the messages that spells a control token (`<|im_end|>`, `</think>`) is
tokenized as the plain text it is, never as the token, so a message cannot forge a turn (OpenAI's
behaviour; OWASP AISVS 2.1.7). Only the template's own text, and assistant turns (the model's own
output, sent back), yield control tokens.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def _trie_pattern(words: set[str]) -> str:
    """A regex matching any of `words` (the longest at a position), as a trie: one alternation of
    thousands of added tokens would try each of them at every position of every message."""
    trie: dict = {}
    for word in filter(None, words):
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        group = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{group})?" if "" in node else group
    return build(trie)


class RenderedTooLong(ValueError):
    """A chat rendered by its template is longer than the caller's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the chat template renders {size} bytes, over {limit}")
        self.size, self.limit = size, limit


def _check_rendered(text: str, max_bytes: int) -> None:
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise RenderedTooLong(len(text.encode()), max_bytes)


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
        decoder = repr(getattr(getattr(self._tok, "backend_tokenizer", None), "decoder", None))
        self._byte_level = "ByteLevel" in decoder
        self._metaspace = "Metaspace" in decoder or "▁" in decoder   # SentencePiece's word marker
        # added and special tokens: stored as their text, not in the byte alphabet, and matched in
        # text as control tokens (special or not: Qwen's <think> is not special)
        added = getattr(self._tok, "added_tokens_decoder", None) or {}
        self._added_ids = frozenset(added) | frozenset(self._tok.all_special_ids)
        controls = {str(t) for t in added.values()} | set(self._tok.all_special_tokens)
        self._controls = re.compile(_trie_pattern(controls)) if any(controls) else None

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text, which may be part of a UTF-8 character (a byte-level
        BPE or byte-fallback token of an emoji): what logprobs' `bytes` report."""
        piece = self._tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._added_ids:
            if m := _BYTE_TOKEN.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
            if self._byte_level and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            if self._metaspace:   # decoded alone, a word's token loses its leading space
                return piece.replace("▁", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            max_bytes: int | None = None, **kwargs) -> list[int]:
        """The chat's prompt tokens; text in `kwargs` or in a message other than an assistant's
        that spells a control token stays text (the module docstring). `max_bytes`: a rendered
        chat longer than that raises `RenderedTooLong` before it is tokenized."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions API")
        marker = f"PDCLIT{secrets.token_hex(6)}"
        literals: list[str] = []
        # an assistant turn is the model's own text, as the template expects it (Qwen3's drops
        # everything up to a </think> in it)
        marked = ([m if m.get("role") == "assistant" else self._mark_controls(m, marker, literals)
                   for m in messages], self._mark_controls(kwargs, marker, literals))
        if not literals:  # nearly every chat: exactly what transformers' tokenize=True gives
            text = self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, **kwargs)
            if max_bytes is not None:
                _check_rendered(text, max_bytes)
            return list(self._tok(text, add_special_tokens=False)["input_ids"])
        text = self._tok.apply_chat_template(marked[0], add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **marked[1])
        # the text transformers renders, and where the marked spellings are in it
        pieces, spans, at = [], [], 0
        for i, part in enumerate(re.split(f"{marker}(\\d+)X", text)):
            if i % 2:
                part = literals[int(part)]
                spans.append((at, at + len(part)))
            pieces.append(part)
            at += len(part)
        rendered = "".join(pieces)
        if max_bytes is not None:
            _check_rendered(rendered, max_bytes)
        # tokenized whole, as transformers does; a control token matched inside a marked span is
        # replaced by the tokens of its text
        enc = self._tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        out: list[int] = []
        for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token in self._added_ids and any(a <= start and end <= b for a, b in spans):
                out += self._plain_ids(rendered[start:end])
            else:
                out.append(token)
        return out

    def _plain_ids(self, text: str) -> list[int]:
        """`text` tokenized with no control token in it: a special token's spelling is split by
        the tokenizer itself; a non-special added token's (Qwen's </think>) by splitting the text."""
        ids = list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))
        if len(text) > 1 and any(t in self._added_ids for t in ids):
            return self._plain_ids(text[:1]) + self._plain_ids(text[1:])
        return ids

    def _mark_controls(self, value, marker: str, literals: list[str]):
        """`value` with every control token's spelling in its strings replaced by `marker<i>X`,
        literals[i] being the spelling (`literals` stays empty when there is none)."""
        if isinstance(value, str):
            if self._controls is None or not self._controls.search(value):
                return value

            def mark(m: re.Match) -> str:
                literals.append(m.group(0))
                return f"{marker}{len(literals) - 1}X"
            return self._controls.sub(mark, value)
        if isinstance(value, dict):  # keys too: a tool schema's property names are rendered
            return {self._mark_controls(k, marker, literals): self._mark_controls(v, marker, literals)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark_controls(v, marker, literals) for v in value]
        return value
