"""Grammar-constrained decoding (JSON object, JSON schema, EBNF, regex, structural tags) with xgrammar.

`StructuredOutput` is the request's constraint, checked when it is built; `GrammarCompiler` (one per
engine) compiles it against the tokenizer and hands each sequence a matcher that masks the vocabulary
at every step and advances with the tokens the sequence accepts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch and xgrammar load on first use: SamplingParams is imported by the ingress
    import torch

KINDS = ("json_object", "json_schema", "ebnf", "regex", "structural_tag")
# "any JSON object": what OpenAI's response_format json_object promises
JSON_OBJECT_SCHEMA = '{"type": "object", "additionalProperties": true}'
COMPILED_CACHE_SIZE = 256


@dataclass(frozen=True)
class StructuredOutput:
    """kind: one of KINDS; grammar: the JSON schema text, EBNF, regex or xgrammar structural-tag JSON
    (ignored for json_object). Raises ValueError, with a message fit for a 400, on a bad grammar."""
    kind: str
    grammar: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.grammar, str):
            raise ValueError("the structured output grammar must be a string")  # noqa: TRY004 (a 400)
        if self.kind == "json_object":
            object.__setattr__(self, "grammar", "")
        elif not self.grammar:
            raise ValueError(f"a {self.kind} structured output needs a grammar")
        _parse(self.kind, self.grammar)   # tokenizer-free check; cached, so the compile reuses it


@lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _parse(kind: str, grammar: str):
    import xgrammar as xgr

    try:
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, **_JSON_STYLE)
        if kind == "json_schema":
            json.loads(grammar)
            return xgr.Grammar.from_json_schema(grammar, **_JSON_STYLE)
        if kind == "ebnf":
            return xgr.Grammar.from_ebnf(grammar)
        if kind == "regex":
            return xgr.Grammar.from_regex(grammar)
        return xgr.Grammar.from_structural_tag(grammar)
    except (RuntimeError, ValueError, TypeError) as exc:
        # xgrammar's messages start with a C++ source location: keep the part a client can act on
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "]" in msg and msg.startswith("["):
            msg = msg.split(": ", 1)[-1]
        raise ValueError(f"invalid {kind} grammar: {msg}") from None


# Compact JSON: a small model given free whitespace can pad an answer with newlines until max_tokens.
_JSON_STYLE = {"any_whitespace": False, "strict_mode": True}


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A bitmask for `batch` rows of logits with every token allowed."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of the tokens bitmask[r] forbids to -inf, for each r in rows (in place)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)


class GrammarCompiler:
    """Compiles constraints for one tokenizer (built once per engine) and makes matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compile = lru_cache(maxsize=COMPILED_CACHE_SIZE)(self._compile_uncached)

    def _compile_uncached(self, kind: str, grammar: str):
        return self._compiler.compile_grammar(_parse(kind, grammar))

    def matcher(self, constraint: StructuredOutput) -> GrammarMatcher:
        return GrammarMatcher(self._xgr.GrammarMatcher(self._compile(constraint.kind, constraint.grammar)))


class GrammarMatcher:
    """One sequence's position in its grammar. `failed` holds why it dead-ended, if it did."""

    def __init__(self, matcher) -> None:
        self._m = matcher
        self.failed: str | None = None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next into bitmask[row]."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def fail(self, why: str) -> None:
        self.failed = self.failed or why

    def accept(self, token: int) -> bool:
        if self.failed is None and not self._m.accept_token(token):
            self.failed = f"token {token} does not fit the grammar"
        return self.failed is None

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self._m.is_terminated()
