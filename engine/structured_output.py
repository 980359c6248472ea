"""Grammar-constrained decoding (JSON object, JSON schema, EBNF, regex, structural tags) with xgrammar.

`StructuredOutput` is the request's constraint, checked when it is built; `GrammarCompiler` (one per
engine) compiles it against the tokenizer and hands each sequence a matcher that masks the vocabulary
at every step and advances with the tokens the sequence accepts.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch and xgrammar load on first use: SamplingParams is imported by the ingress
    import torch

KINDS = ("json_object", "json_schema", "ebnf", "regex", "structural_tag")
# "any JSON object": what OpenAI's response_format json_object promises
JSON_OBJECT_SCHEMA = '{"type": "object", "additionalProperties": true}'
COMPILED_CACHE_SIZE = 256
# A few hundred bytes of schema can take xgrammar seconds to parse (a pattern's `{1,5000}`, objects
# nested hundreds deep), so checking a grammar gets this long from when a thread of its own takes it
# up (xgrammar lets the GIL go meanwhile): over it, the grammar is refused as too complex, at once
# from then on. A check that ran out holds its thread until xgrammar is done (it cannot be stopped),
# so at most PARSE_THREADS run at once; one that waits a whole budget for a thread is refused as
# busy, not as too complex. Requests checking the same grammar share one check.
PARSE_BUDGET_S = 5.0
PARSE_THREADS = 2


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
        # tokenizer-free check; cached, so the compile reuses it
        check_within_budget(self.kind, self.grammar)


class GrammarChecksBusy(RuntimeError):
    """Every grammar-check thread stayed busy with other grammars for a whole budget: retry later
    (the server's state, not the grammar's fault: a 503)."""


@dataclass
class _Check:
    """One grammar's check, shared by the requests that ask for it while it runs."""
    started: threading.Event
    future: Future | None = None
    started_at: float = 0.0   # time.monotonic() when a thread took it up


_parse_pool: ThreadPoolExecutor | None = None
_checks: dict[tuple[str, str], _Check] = {}                        # under way
_checked: OrderedDict[tuple[str, str], None] = OrderedDict()      # parsed: passed at once
_too_slow: OrderedDict[tuple[str, str], None] = OrderedDict()     # ran out: refused at once
_budget_lock = threading.Lock()


def check_within_budget(kind: str, grammar: str, budget_s: float = PARSE_BUDGET_S) -> None:
    """Parse the grammar on a grammar-check thread, for at most `budget_s` once one takes it up;
    ValueError (fit for a 400) if it is invalid or took longer, GrammarChecksBusy if no thread took
    it up within `budget_s`."""
    global _parse_pool
    import xgrammar  # noqa: F401 - loaded here, not on the budget's clock

    key = (kind, grammar)
    with _budget_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return
        if key in _too_slow:
            raise ValueError(_too_complex(kind, budget_s))
        if _parse_pool is None:
            _parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="grammar-check")
        check = _checks.get(key)
        if check is None:
            check = _checks[key] = _Check(threading.Event())
            check.future = _parse_pool.submit(_run_check, key, check)
    if not check.started.wait(budget_s):
        with _budget_lock:
            if check.future.cancel() and _checks.get(key) is check:   # never ran: the next asks anew
                del _checks[key]
        raise GrammarChecksBusy(f"the server's grammar checks are busy: no thread was free for {budget_s:g} s")
    try:
        check.future.result(timeout=max(0.0, check.started_at + budget_s - time.monotonic()))
    except FutureTimeout:
        _remember(_too_slow, key)
        raise ValueError(_too_complex(kind, budget_s)) from None
    _remember(_checked, key)


def _run_check(key: tuple[str, str], check: _Check):
    check.started_at = time.monotonic()
    check.started.set()
    try:
        return _parse(*key)
    finally:
        with _budget_lock:
            if _checks.get(key) is check:
                del _checks[key]


def _remember(verdicts: OrderedDict, key: tuple[str, str]) -> None:
    with _budget_lock:
        verdicts[key] = None
        verdicts.move_to_end(key)
        while len(verdicts) > COMPILED_CACHE_SIZE:
            verdicts.popitem(last=False)


def _too_complex(kind: str, budget_s: float) -> str:
    return (f"the {kind} grammar is too complex: checking it takes over {budget_s:g} s (simplify "
            "it: fewer nesting levels, smaller repetition counts in patterns)")


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

# JSON Schema keywords xgrammar (0.2.9) compiles without enforcing them (it drops them, some with a
# warning on stderr), found by probing it with instances that break each: where a client asks for
# strict adherence, a schema using one is refused rather than answered with JSON that breaks it.
_NOT_ENFORCED = ("uniqueItems", "not", "if", "dependentRequired", "dependentSchemas", "dependencies",
                 "contains", "minContains", "maxContains")
# where a schema holds subschemas: keyword -> "map" (name -> schema), "list" or "one" (a schema)
_SUBSCHEMAS = {"properties": "map", "patternProperties": "map", "$defs": "map", "definitions": "map",
               "additionalProperties": "one", "unevaluatedProperties": "one", "propertyNames": "one",
               "items": "one", "prefixItems": "list", "anyOf": "list", "oneOf": "list", "allOf": "list"}


def unenforceable(schema: object, at: str = "") -> str | None:
    """Why constrained decoding cannot hold output to this JSON schema (a keyword the grammar engine
    drops), naming where; None if it can. Never raises: a malformed schema is the compiler's to refuse."""
    if not isinstance(schema, dict):
        return None
    where = at or "the schema's root"
    for key in _NOT_ENFORCED:
        value = schema.get(key)
        # null asks nothing; nor does uniqueItems other than true, nor an empty dependencies map
        asks_nothing = (value is None or key == "uniqueItems" and value is not True
                        or key.startswith("depend") and not value)
        if not asks_nothing:
            return f"{key!r} (at {where}) cannot be enforced by this server's constrained decoding"
    types, step = schema.get("type"), schema.get("multipleOf")
    if step is not None and not (types == "integer" and isinstance(step, int) and not isinstance(step, bool)):
        return f"'multipleOf' (at {where}) is enforced only as an integer step of type 'integer'"
    lengths = {k: schema[k] for k in ("minLength", "maxLength") if k in schema}
    if "format" in schema and lengths.get("minLength", 0) in (0, 1):  # every format is non-empty
        lengths.pop("minLength", None)
    if lengths and ("pattern" in schema or "format" in schema):
        return (f"{'/'.join(repr(k) for k in lengths)} (at {where}) cannot be enforced beside 'pattern' "
                "or 'format'; fold the length into the pattern")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return (f"'$ref' to {ref[:80]!r} (at {where}) cannot be enforced: only references into the "
                "schema itself ('#/...') are resolved")
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and any(a in pattern for a in ("(?=", "(?!", "(?<=", "(?<!")):
        return f"a lookaround in 'pattern' (at {where}) cannot be enforced: the grammar engine drops it"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with more than one schema (at {where}) cannot be enforced; merge them"
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    missing = [name for name in required if isinstance(name, str) and name not in properties]
    if missing:
        return (f"'required' names {missing[0]!r} (at {where}), which is not among the 'properties': "
                "constrained decoding cannot require it")
    if problem := _values_outside_type(schema, where):
        return problem
    for key, shape in _SUBSCHEMAS.items():
        sub = schema.get(key)
        if isinstance(sub, dict) and shape == "map":
            children = [(f"{at}/{key}/{name}", s) for name, s in sub.items()]
        elif isinstance(sub, list):
            children = [(f"{at}/{key}/{i}", s) for i, s in enumerate(sub)]
        else:
            children = [(f"{at}/{key}", sub)]
        for path, child in children:
            if problem := unenforceable(child, path):
                return problem
    return None


def _values_outside_type(schema: dict, where: str) -> str | None:
    """An enum or const value the schema's `type` excludes (the grammar lets the value through)."""
    import jsonschema

    types = schema.get("type")
    values = list(schema["enum"]) if isinstance(schema.get("enum"), list) else []
    values += [schema["const"]] if "const" in schema else []
    if types is None or not values:
        return None
    try:
        check = jsonschema.Draft202012Validator({"type": types})
        outside = [v for v in values if not check.is_valid(v)]
    except Exception:  # an unknown type name: the compiler refuses the schema itself
        return None
    if outside:
        return f"the value {outside[0]!r} (at {where}) does not have the schema's type {types!r}"
    return None


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A bitmask for `batch` rows of logits with every token allowed."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of the tokens bitmask[r] forbids to -inf, for each r in rows (in place)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)


class GrammarCompiler:
    """Compiles constraints for one tokenizer (built once per engine) and makes matchers.
    `background`: a grammar not compiled yet compiles on a thread of its own (`compiling`) while
    the engine steps on, as vLLM's requests wait for their grammar; else `matcher` compiles it.
    Called from the engine's thread only."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int],
                 background: bool = False) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()   # least recent first
        self._pending: dict[tuple[str, str], Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile") if background else None

    def _compile_uncached(self, kind: str, grammar: str):
        return self._compiler.compile_grammar(_parse(kind, grammar))

    def compiling(self, constraint: StructuredOutput) -> Future | None:
        """The compile under way for `constraint` (started now if need be), or None when `matcher`
        can be had without waiting (compiled already, or no background thread)."""
        key = (constraint.kind, constraint.grammar)
        if self._pool is None or key in self._compiled:
            return None
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._compile_uncached, *key)
        return self._pending[key]

    def forget(self, constraint: StructuredOutput) -> None:
        """No request waits for this constraint's compile any more: stop it if it has not started."""
        pending = self._pending.pop((constraint.kind, constraint.grammar), None)
        if pending is not None:
            pending.cancel()

    def matcher(self, constraint: StructuredOutput, compiled_by: Future | None = None) -> GrammarMatcher:
        """A matcher at the grammar's start, from `compiled_by` (the request's background compile)
        where given; raises the compile's error (ValueError for a grammar that does not compile)."""
        key = (constraint.kind, constraint.grammar)
        compiled = self._compiled.get(key)
        if compiled is None:
            if self._pending.get(key) is compiled_by:
                self._pending.pop(key, None)
            compiled = compiled_by.result() if compiled_by is not None else self._compile_uncached(*key)
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return GrammarMatcher(self._xgr.GrammarMatcher(compiled))


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
