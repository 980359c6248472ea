"""How an admitted request's choices become what the client reads: one OpenAI JSON body, an SSE
stream of OpenAI chunks, or inference.proto's GenerateResponse messages.

The ingress hands over the choices' records, their chat parsers (None for completions) and the
merged (choice index, Delta) steps the orchestrator yields; every renderer closes those steps however
it ends, which frees what the requests hold.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...engine.outputs import TokenLogprob
from ...proto import inference_pb2 as pb
from . import grpc_service
from . import openai_protocol as oai
from .chat_output import ChatOutput
from .orchestrator import Delta, RequestRecord

Choices = AsyncIterator[tuple[int, Delta]]


# An event stream is never cached, and a reverse proxy in front (nginx buffers by default) passes
# each event on as it comes instead of holding tokens back until its buffer fills.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends: Starlette leaves a generator that was
    suspended at a `yield` when the client went away to the garbage collector, and ours holds an
    admission slot and KV blocks that must be freed now."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def error_response(exc: oai.OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def choices_usage(recs: list[RequestRecord], outs: list[ChatOutput | None]) -> dict[str, Any]:
    """The usage of a request's choices (the prompt counted once); a chat answer under a reasoning
    parser also counts its reasoning tokens."""
    first = recs[0]
    reasoning = None
    if outs[0] is not None and outs[0].reasoning is not None:
        reasoning = sum(o.reasoning_tokens for o in outs)
    return oai.usage(first.prompt_tokens, sum(r.output_tokens for r in recs), first.cached_tokens,
                     reasoning)


class ResponseRenderer:
    """Renders responses for one served model (listed as created at `model_created`); `token_text`
    spells a token as logprobs show it, `token_bytes` gives its bytes."""

    def __init__(self, model_name: str, model_created: int, token_text: Callable[[int], str],
                 token_bytes: Callable[[int], bytes] | None = None) -> None:
        self.model_name = model_name
        self.model_created = model_created
        self.token_text = token_text
        self.token_bytes = token_bytes  # a token's own bytes (None: its text's)

    def logprobs(self, chat: bool, entries: list[TokenLogprob],
                 offsets: oai.TextOffsets | None = None) -> dict[str, Any]:
        """`offsets`: a completion choice's text offsets so far (None: these are its first tokens)."""
        if chat:
            return oai.chat_logprobs(entries, self.token_text, self.token_bytes)
        return oai.completion_logprobs(entries, self.token_text, offsets, self.token_bytes)

    async def json(self, recs: list[RequestRecord], outs: list[ChatOutput | None],
                   choices: Choices) -> Response:
        """The whole answer as one chat.completion or text_completion body (an error body if the
        request fails before it ends)."""
        text, finish, logprobs = [[] for _ in recs], [None] * len(recs), [[] for _ in recs]
        try:
            async for i, d in choices:
                text[i].append(d.text)
                logprobs[i] += d.logprobs
                finish[i] = d.finish_reason or finish[i]
                if outs[i] is not None:
                    outs[i].feed(d.text, len(d.token_ids))
        except oai.OpenAIError as exc:
            return error_response(exc)
        finally:
            await choices.aclose()
        name, rid, created = self.model_name, recs[0].request_id, recs[0].created
        chat = outs[0] is not None
        lps = [self.logprobs(chat, lp) if recs[0].params.logprobs is not None else None
               for lp in logprobs]
        if not chat:
            return JSONResponse(oai.completion(rid, name, created, [
                oai.completion_choice("".join(t), f, lp, i)
                for i, (t, f, lp) in enumerate(zip(text, finish, lps))], choices_usage(recs, outs)))
        return JSONResponse(oai.chat_completion(rid, name, created, [
            oai.chat_choice(o.message("", 0), o.finish_reason(f), lp, i)
            for i, (o, f, lp) in enumerate(zip(outs, finish, lps))], choices_usage(recs, outs)))

    async def sse(self, recs: list[RequestRecord], outs: list[ChatOutput | None], choices: Choices,
                  include_usage: bool, continuous_usage: bool = False) -> AsyncIterator[str]:
        """The answer as server-sent events: OpenAI's chunks, by choice index, then `[DONE]`; an
        error once streaming is an error event, as OpenAI sends it. `include_usage`: a last chunk
        with the usage of all the choices; `continuous_usage`: every chunk with its choice's usage
        so far (its completion tokens up to and with that chunk's), as vLLM's continuous_usage_stats."""
        model, rid, created = self.model_name, recs[0].request_id, recs[0].created
        chat = outs[0] is not None
        want_lp = recs[0].params.logprobs is not None
        offsets = [oai.TextOffsets() for _ in recs]   # completions' text_offset, by choice
        tokens = [0] * len(recs)                      # completion tokens so far, by choice

        def event(chunk: dict[str, Any], i: int) -> str:
            if continuous_usage:
                rec = recs[i]   # the role chunk goes before the engine has counted the prompt
                chunk["usage"] = oai.usage(rec.prompt_tokens or len(rec.prompt_ids), tokens[i],
                                           rec.cached_tokens)
            elif include_usage:   # as OpenAI's: the chunks before the usage chunk say null
                chunk["usage"] = None
            return oai.sse(chunk)

        try:
            if chat:
                for i in range(len(recs)):
                    yield event(oai.chat_chunk(rid, model, created, {"role": "assistant", "content": ""},
                                               index=i), i)
            async for i, d in choices:
                tokens[i] += len(d.token_ids)
                # a token whose text is held back (a partial character, a possible stop string)
                # still reports its logprob in this chunk
                lp = self.logprobs(chat, d.logprobs, offsets[i]) if want_lp and d.logprobs else None
                if chat:
                    out = outs[i]
                    deltas = out.feed(d.text, len(d.token_ids), final=d.finish_reason is not None)
                    if lp and not deltas:
                        deltas = [{"content": ""}]
                    for j, delta in enumerate(deltas):  # the step's logprobs ride on its first chunk
                        yield event(oai.chat_chunk(rid, model, created, delta,
                                                   logprobs=lp if j == 0 else None, index=i), i)
                    if d.finish_reason:
                        yield event(oai.chat_chunk(rid, model, created, {},
                                                   out.finish_reason(d.finish_reason), index=i), i)
                elif d.text or d.finish_reason or lp:
                    yield event(oai.completion_chunk(rid, model, created, d.text, d.finish_reason, lp,
                                                     index=i), i)
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield oai.sse(oai.usage_chunk(rid, model, created, obj, choices_usage(recs, outs)))
        except oai.OpenAIError as exc:  # the status line is gone: report in the stream, as OpenAI does
            yield oai.sse(exc.body())
        finally:
            await choices.aclose()
        yield oai.sse("[DONE]")

    async def grpc(self, recs: list[RequestRecord], outs: list[ChatOutput | None],
                   choices: Choices) -> AsyncIterator[Any]:
        """The answer as GenerateResponse messages, one per step of a choice; the stream's last
        message carries the usage of all the choices. Errors propagate (the caller sets the status)."""
        unfinished = len(recs)
        try:
            async for i, d in choices:
                text, reasoning, calls, finish = d.text, "", [], d.finish_reason
                if outs[i] is not None:
                    deltas = outs[i].feed(d.text, len(d.token_ids), final=finish is not None)
                    text, reasoning, calls = grpc_service.response_parts(deltas)
                    finish = outs[i].finish_reason(finish)
                unfinished -= finish is not None
                use = choices_usage(recs, outs) if finish and not unfinished else None
                yield pb.GenerateResponse(
                    request_id=recs[0].request_id, index=i, text=text, token_ids=d.token_ids,
                    logprobs=[pb.TokenLogprob(
                        token_id=e.token_id, token=self.token_text(e.token_id), logprob=e.logprob,
                        top=[pb.TopLogprob(token_id=t, token=self.token_text(t), logprob=v)
                             for t, v in e.top]) for e in d.logprobs],
                    finish_reason=finish or "", reasoning_text=reasoning, tool_calls=calls,
                    usage=grpc_service.usage_message(use) if use else None)
        finally:
            await choices.aclose()
