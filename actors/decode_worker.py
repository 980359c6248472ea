"""Decode worker actor: continues requests a prefill worker started and streams their tokens back
to the ingress (a Ray streaming generator). One per decode node (placed by the pool's role resource).
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import ray

from .worker import EngineWorker
from .engine_loop import RequestAborted
from ..engine.kv_handoff import KVHandoff
from ..engine.outputs import RequestOutput
from ..engine.sampling import SamplingParams


class DecodeWorker(EngineWorker):
    role = "decode"

    @ray.method(num_returns="streaming")
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       handoff: KVHandoff | None, generated_token_ids: list[int] | None = None,
                       ) -> AsyncIterator[list[RequestOutput]]:
        """Pull the prompt's KV named in `handoff` (or compute it: colocated mode passes None), then
        yield the outputs of each
        engine step after the tokens the client has (`generated_token_ids`, by default the first
        token), batched when the consumer falls behind. Cancelling the generator (ray.cancel) or
        calling abort() frees the request's blocks."""
        queue = self.loop.submit(request_id, prompt_token_ids, params, kv_import=handoff,
                                 generated_token_ids=generated_token_ids)
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outputs: list[RequestOutput] = []
                for item in batch:
                    if isinstance(item, RequestAborted):
                        return
                    if isinstance(item, BaseException):
                        raise item
                    outputs.append(item)
                yield outputs
                if outputs[-1].finished:
                    return
        finally:
            self.loop.abort(request_id)  # no-op once finished; frees the blocks on cancel or error
