"""Incremental detokenization with stop strings, for streaming.

Text is released only when it is final: an incomplete UTF-8 character is held back, and so is any
tail that could still become the start of a stop string. A request that ends mid-character ends its
text with U+FFFD, as decoding all its tokens at once does. Stop strings count only from a request's
min_tokens-th token on, as in vLLM: a stop string that ends before it does not end the request.
"""
from __future__ import annotations

from .tokenizer import Tokenizer

_CONTEXT_TOKENS = 6   # prompt tail decoded with the output, so the first words get their spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (),
                 include_stop: bool = False, skip_special_tokens: bool = True,
                 min_tokens: int = 0) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""          # output text so far (cut at a stop string)
        self.emitted = 0        # characters of self.text already released
        self.stopped = False
        self.min_tokens = min_tokens
        self.num_tokens = 0     # generated tokens pushed so far

    def push(self, token_ids: list[int]) -> bool:
        """Add generated tokens; True if a stop string was hit (the text is then cut there)."""
        for t in token_ids:
            if self.stopped:
                break
            self.ids.append(t)
            self.num_tokens += 1
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
            full = self.tok.decode(self.ids[self.prefix_offset:], self.skip_special)
            if full.endswith("\ufffd") or len(full) <= len(prefix):
                continue        # mid-character, or a token with no text yet
            start = max(len(self.text) - self.holdback, 0)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.num_tokens >= self.min_tokens:
                self._check_stop(start)
        return self.stopped

    def _check_stop(self, start: int) -> None:
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + len(s) if self.include_stop else i]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text that is safe to release now (all of it once the sequence is finished)."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            # tokens holding part of a character: they count, so their text shows as U+FFFD
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
            full = self.tok.decode(self.ids[self.prefix_offset:], self.skip_special)
            start = max(len(self.text) - self.holdback, 0)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.num_tokens >= self.min_tokens:
                self._check_stop(start)
        end = len(self.text) if (final or self.stopped) else max(len(self.text) - self.holdback, 0)
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
