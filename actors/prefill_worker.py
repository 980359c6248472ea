"""Prefill worker actor: computes a prompt's KV, writes it to the store and returns the first token
with the handoff (kv.proto bytes). One per prefill node (placed by the pool's role resource).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..cluster.kvstore.manifest import encode_handoff
from ..engine.outputs import TokenLogprob
from ..engine.sampling import SamplingParams
from .worker import EngineWorker


@dataclass(frozen=True)
class PrefillResult:
    """The first token of a request, and how decode continues it."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None: decode continues from `handoff`; else the request is complete
    handoff: bytes | None  # kv.proto KVHandoff: the prompt, its first token and its blocks' keys
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens taken from a prefix cache (local or the store)
    seconds: float  # from arrival at this worker to the first token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None  # why the engine ended it, with finish_reason "error"


class PrefillWorker(EngineWorker):
    role = "prefill"

    async def prefill(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> PrefillResult:
        """Run the prompt and sample its first token. A request that wants a single token is served
        here in full (no handoff), so its last text is flushed and its finish_reason is the real one.

        Raises ValueError when the request does not fit this engine."""
        t0 = time.perf_counter()
        # max_tokens == 1: nothing for decode to do. Export otherwise: the engine stops after the first
        # token and reports finish_reason "handoff" (unless the token already finished the request).
        export = params.max_tokens != 1
        queue: asyncio.Queue = asyncio.Queue()
        self.loop.submit(request_id, prompt_token_ids, params, queue.put_nowait, kv_export=export)
        try:
            out = await queue.get()
        except asyncio.CancelledError:
            self.loop.abort(request_id)
            raise
        if isinstance(out, BaseException):
            raise out
        # A kv_export request always finishes on its first output.
        done = out.finish_reason != "handoff"
        return PrefillResult(
            request_id=request_id, token_ids=list(out.new_token_ids), text=out.delta_text,
            finish_reason=out.finish_reason if done else None,
            handoff=None if done else encode_handoff(out.kv_handoff), num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens, seconds=time.perf_counter() - t0,
            logprobs=list(out.logprobs), error=out.error)
