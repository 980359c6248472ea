"""A stream's tokens leave the engine `interval` at a time (`engine.stream_interval`, vLLM's and
SGLang's `stream_interval`): each request's step outputs are held on the engine's side and merged
until `interval` new tokens have gathered, so they cross to the worker actor, the ingress, Serve's
proxy and the client as one message rather than one per token. Fewer, larger chunks cost the
serving processes less CPU per token; the price is a burstier stream. A request's first output (its
time to first token), its last, an error and a prefill's handoff always go at once, and an interval
of 1 passes every step's outputs through untouched.
"""
from __future__ import annotations

from dataclasses import replace

from ..engine.outputs import RequestOutput

Result = tuple[str, RequestOutput | BaseException]


def merged(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for `first` followed by `later`: their tokens, text and logprobs in
    order; everything else (finished, counts, handoff, error) as of `later`."""
    return replace(later, new_token_ids=first.new_token_ids + later.new_token_ids,
                   delta_text=first.delta_text + later.delta_text,
                   logprobs=first.logprobs + later.logprobs)


class OutputCoalescer:
    """Used on the engine's thread: `feed` each step's results, send what it returns."""

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"stream interval must be at least 1, got {interval}")
        self.interval = interval
        self._held: dict[str, RequestOutput] = {}   # request id -> its outputs not yet sent, merged
        self._started: set[str] = set()             # requests whose first output has gone

    @property
    def num_held(self) -> int:
        return len(self._held)

    def feed(self, results: list[Result]) -> list[Result]:
        """The results to send now, in their order (each request's in the order made)."""
        if self.interval == 1:
            return results
        out: list[Result] = []
        for request_id, item in results:
            held = self._held.pop(request_id, None)
            if isinstance(item, BaseException):   # what was held goes first, then the error
                if held is not None:
                    out.append((request_id, held))
                self._started.discard(request_id)
                out.append((request_id, item))
                continue
            if held is not None:
                item = merged(held, item)
            if item.finished:
                self._started.discard(request_id)
            elif request_id in self._started and len(item.new_token_ids) < self.interval \
                    and item.kv_handoff is None and item.error is None:
                self._held[request_id] = item
                continue
            else:
                self._started.add(request_id)
            out.append((request_id, item))
        return out

    def drop(self, request_id: str) -> None:
        """Forget an aborted request (what it held is no longer wanted)."""
        self._held.pop(request_id, None)
        self._started.discard(request_id)
