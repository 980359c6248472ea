"""Decode worker actor: continues requests a prefill worker started and streams their tokens back
to the ingress (a Ray streaming generator). One per decode node (placed by the pool's role resource).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import ray

from ..cluster.kvstore.manifest import ManifestError, decode_handoff
from ..engine.outputs import RequestOutput
from ..engine.sampling import SamplingParams
from .engine_loop import RequestAborted
from .worker import EngineWorker


class HandoffRefused(RuntimeError):
    """The prefill side's handoff cannot be read here (another manifest version, another model)."""


class DecodeWorker(EngineWorker):
    role = "decode"

    @ray.method(num_returns="streaming")
    async def generate(self, request_id: str, params: SamplingParams, handoff: bytes | None,
                       prompt_token_ids: Sequence[int] = (), streamed_token_ids: Sequence[int] = (),
                       ) -> AsyncIterator[list[RequestOutput]]:
        """Continue a request and yield the outputs of each engine step, batched when the consumer
        falls behind. Disaggregated: `handoff` (kv.proto bytes from the prefill worker) carries the
        prompt, its first token and where its KV is. Colocated: `handoff` is None and this worker
        computes `prompt_token_ids` itself. `streamed_token_ids`: tokens the client already has
        beyond those (after a failover), which this worker continues after. Cancelling the generator
        (ray.cancel) or calling abort() frees the request's blocks."""
        generated = list(streamed_token_ids)
        kv_import = None
        if handoff is not None:
            try:
                kv_import = decode_handoff(handoff)
            except ManifestError as exc:
                raise HandoffRefused(f"the KV handoff cannot be read here: {exc}") from None
            prompt_token_ids = kv_import.token_ids
            generated.insert(0, kv_import.first_token)
        queue = self.loop.submit(request_id, list(prompt_token_ids), params, kv_import=kv_import,
                                 generated_token_ids=generated)
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
