"""What one engine step reports for one request: the new tokens, the new text, and why it ended."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    # "stop" | "length" | "abort" | "handoff" (prefill done, decode continues) | "error" (see
    # `error`: a structured output that dead-ended) | None while running
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int               # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None
    kv_handoff: object | None = None     # KVHandoff, on the last output of a kv_export request
