"""Ray Serve ingress: the OpenAI HTTP API and the gRPC Inference service over the PD cluster.

Per request: validate and tokenize here, admit through the router, run the prompt on the chosen
prefill worker (its first token is the TTFT), then stream the rest straight from the decode worker.
"""
import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...actors.engine_loop import RequestAborted
from ...actors.router import HEAD_NODE, Admission, get_or_create_router
from . import openai_protocol as oai
from .grpc_service import Undecodable
from .metrics import CONTENT_TYPE, ServingMetrics
from .openapi import openapi_document
from ..policy.prefix_affinity import prefix_block_hashes
from ..spec import ClusterSpec
from ...engine.sampling import SamplingParams

log = logging.getLogger(__name__)

ROUTER_TIMEOUT_S = 10.0
MAX_FAILOVERS = 2  # per request and phase: how many lost workers a request survives
# HTTP status of an OpenAIError -> gRPC status code
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
               429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
# Admission reject reasons that are not "busy, retry later"
_REJECT_STATUS = {"too_long": 400, "no_worker": 503, "draining": 503}
_REJECT_MESSAGE = {"draining": "the server is shutting down and admits no new requests; retry "
                               "on another replica or later"}

app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass
class _Run:
    """One request as the ingress runs it; the counters fill in as tokens arrive."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str | None
    arrived: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return oai.usage(self.prompt_tokens, self.output_tokens, self.cached_tokens)


@dataclass(frozen=True)
class _Delta:
    token_ids: list[int]
    text: str
    finish_reason: str | None


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends: Starlette leaves a generator that was
    suspended at a `yield` when the client went away to the garbage collector, and ours holds an
    admission slot and KV blocks that must be freed now."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _api_keys(env_name: str | None) -> dict[str, str]:
    """key -> tenant from the env var the spec names (the spec never holds keys itself)."""
    if not env_name:
        return {}
    keys = oai.parse_api_keys(os.environ.get(env_name, ""))
    if not keys:
        raise RuntimeError(f"serve.api_keys_env names {env_name!r}, but that variable holds no keys")
    return keys


class _WorkerLost(Exception):
    """A worker actor died or cannot be reached during a call."""


def _stopped() -> oai.OpenAIError:
    """A worker aborted the request (the end of a drain that timed out)."""
    return oai.OpenAIError(503, "the request was stopped before it finished because the server is "
                           "shutting down; retry", code="aborted", retry_after_s=1.0)


def _error(exc: oai.OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _unwrap(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The JSON body, refused by its headers before it is read and cut off once over the limit
    (a chunked body declares no length)."""
    headers = request.headers
    oai.check_body_headers(headers.get("content-type"), headers.get("content-encoding"),
                           headers.get("content-length"), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise oai.too_large(max_bytes)
    return bytes(body)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # Unknown routes and methods get OpenAI's error body too (a 405 keeps its Allow header).
    response = _error(oai.OpenAIError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    return response


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return _error(oai.OpenAIError(500, "internal server error"))


@serve.deployment
@serve.ingress(app)
class Ingress:
    async def __init__(self, spec: dict) -> None:
        from ...engine.tokenizer import Tokenizer
        from ...engine.weights import resolve_model_path

        self.spec = ClusterSpec.from_dict(spec)
        self.router = get_or_create_router(self.spec)
        if await self.router.spec_dict.remote() != self.spec.to_dict():
            raise RuntimeError("a pdcluster router with a different spec is already running; "
                               "stop it first (`pdcluster down`)")
        self.info = await self.router.ready.remote()
        self.tokenizer = await asyncio.to_thread(Tokenizer, resolve_model_path(self.spec.model.path))
        self.metrics = ServingMetrics()
        self.api_keys = _api_keys(self.spec.serve.api_keys_env)
        self.created = int(time.time())
        log.info("ingress ready for %s (%d workers)", self.info.model_name, len(self.info.workers))

    async def check_health(self) -> None:
        """Serve's replica health check: a dead router means this replica must be replaced (its
        successor creates a new router, which starts fresh workers)."""
        await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_TIMEOUT_S)

    # ------------------------------------------------------------------ HTTP routes
    @app.get("/health")
    async def health(self) -> Response:
        try:
            snap = await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            return JSONResponse({"status": "unavailable", "detail": f"router: {exc}"}, 503)
        if snap.draining:  # load balancers stop sending here; in-flight requests still finish
            return JSONResponse({"status": "draining", "in_flight": snap.in_flight}, 503)
        roles = {w.info.role for w in snap.workers if w.healthy}
        if roles != ({"decode"} if self.spec.colocated else {"prefill", "decode"}):
            return JSONResponse({"status": "unavailable", "detail": "no healthy worker in a pool"}, 503)
        return JSONResponse({"status": "ok", "in_flight": snap.in_flight, "queued": snap.queued})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        try:
            snap = await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError):
            snap = None
        self.metrics.set_cluster(snap)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi(self) -> Response:
        return JSONResponse(openapi_document(self.info.model_name, self.info.vocab_size,
                                             bool(self.api_keys)))

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._tenant(request.headers.get("authorization"))
        except oai.OpenAIError as exc:
            return _error(exc)
        return JSONResponse(oai.model_list(self.info.model_name, self.created))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            req, tenant = await self._parse(request, oai.ChatCompletionRequest)
            run = self._new_run("chatcmpl", self._chat_ids(req), req, tenant)
        except oai.OpenAIError as exc:
            return _error(exc)
        return await self._respond(run, req, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            req, tenant = await self._parse(request, oai.CompletionRequest)
            prompt = req.single_prompt()
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            run = self._new_run("cmpl", ids, req, tenant)
        except oai.OpenAIError as exc:
            return _error(exc)
        return await self._respond(run, req, chat=False)

    # ------------------------------------------------------------------ gRPC
    async def Generate(self, request, grpc_context) -> AsyncIterator[Any]:
        """inference.proto's server-streaming Generate (through Serve's gRPC proxy)."""
        from ...proto import inference_pb2 as pb

        try:
            metadata = dict(grpc_context.invocation_metadata())
            tenant = self._tenant(metadata.get("authorization"))
            if isinstance(request, Undecodable):
                raise oai.OpenAIError(400, f"the request is not a GenerateRequest: {request.error}")
            run = self._grpc_run(request, tenant)
            steps = self._steps(run)
            await self._admitted(steps)
        except oai.OpenAIError as exc:
            grpc_context.set_code(_GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
            retry = f" (retry after {exc.headers()['Retry-After']}s)" if exc.retry_after_s else ""
            grpc_context.set_details(exc.message + retry)
            raise
        try:
            async for d in steps:
                yield pb.GenerateResponse(
                    request_id=run.request_id, text=d.text, token_ids=d.token_ids,
                    finish_reason=d.finish_reason or "",
                    usage=pb.Usage(prompt_tokens=run.prompt_tokens,
                                   completion_tokens=run.output_tokens,
                                   cached_tokens=run.cached_tokens) if d.finish_reason else None)
        except oai.OpenAIError as exc:
            grpc_context.set_code(_GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(exc.message)
            raise
        finally:
            await steps.aclose()

    def _grpc_run(self, request, tenant: str | None) -> _Run:
        inputs = [bool(request.prompt), bool(request.messages), bool(request.prompt_token_ids)]
        if sum(inputs) != 1:
            raise oai.OpenAIError(400, "set exactly one of prompt, messages, prompt_token_ids")
        data: dict[str, Any] = {"model": request.model or None, "stop": list(request.stop) or None,
                                "ignore_eos": request.ignore_eos, "max_tokens": None}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            if request.HasField(name):
                data[name] = getattr(request, name)
        if request.messages:
            data["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            req = oai.validate(oai.ChatCompletionRequest, data)
            self._check_model(req.model)
            ids = self._chat_ids(req)
        else:
            data["prompt"] = request.prompt or list(request.prompt_token_ids)
            req = oai.validate(oai.CompletionRequest, data)
            self._check_model(req.model)
            prompt = req.single_prompt()
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._new_run("grpc", ids, req, tenant)

    # ------------------------------------------------------------------ request plumbing
    async def _parse(self, request: Request, model: type) -> tuple[Any, str | None]:
        """Authenticate, read (within the size limit) and validate a request body for this model."""
        tenant = self._tenant(request.headers.get("authorization"))
        limit = self.spec.serve.max_body_bytes
        req = oai.parse(model, await _read_body(request, limit), limit)
        self._check_model(req.model)
        return req, tenant

    def _tenant(self, authorization: str | None) -> str | None:
        return oai.tenant_for(authorization, self.api_keys)

    def _chat_ids(self, req: oai.ChatCompletionRequest) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template(req.chat())
        except ValueError as exc:  # no chat template
            raise oai.OpenAIError(400, str(exc), param="messages") from None

    def _check_model(self, model: str | None) -> None:
        if model and model != self.info.model_name:
            raise oai.OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                                  f"{self.info.model_name!r}", param="model", code="model_not_found")

    def _new_run(self, prefix: str, ids: list[int], req: Any, tenant: str | None) -> _Run:
        """Checks the prompt against the model (vocabulary, context) and fixes max_tokens."""
        vocab, context = self.info.vocab_size, self.info.max_model_len
        if not ids:
            raise oai.OpenAIError(400, "the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise oai.OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        room = context - len(ids)
        if room < 1:
            raise oai.OpenAIError(400, f"the prompt is {len(ids)} tokens; this model's context is "
                                  f"{context} tokens", param="messages" if prefix == "chatcmpl"
                                  else "prompt", code="context_length_exceeded")
        wanted = req.requested_max_tokens()
        if wanted is not None and wanted > room:
            raise oai.OpenAIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({wanted}) exceeds "
                                  f"the context of {context} tokens", param="max_tokens",
                                  code="context_length_exceeded")
        return _Run(f"{prefix}-{uuid.uuid4().hex}", ids, req.sampling_params(wanted or room), tenant)

    async def _respond(self, run: _Run, req: Any, chat: bool) -> Response:
        steps = self._steps(run)
        try:
            await self._admitted(steps)
        except oai.OpenAIError as exc:
            return _error(exc)
        if req.stream:
            return _ClosingStreamingResponse(self._sse(run, steps, chat, req.include_usage),
                                             media_type="text/event-stream")
        text, finish = [], None
        try:
            async for d in steps:
                text.append(d.text)
                finish = d.finish_reason or finish
        except oai.OpenAIError as exc:
            return _error(exc)
        finally:
            await steps.aclose()
        build = oai.chat_completion if chat else oai.completion
        return JSONResponse(build(run.request_id, self.info.model_name, self.created, "".join(text),
                                  finish, run.usage()))

    @staticmethod
    async def _admitted(steps: AsyncIterator[_Delta | None]) -> None:
        """Advance a fresh `_steps` past admission (raising its rejection), closing it on failure."""
        try:
            await steps.__anext__()
        except BaseException:
            await steps.aclose()
            raise

    async def _sse(self, run: _Run, steps: AsyncIterator[_Delta], chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        model, rid, created = self.info.model_name, run.request_id, self.created
        try:
            if chat:
                yield oai.sse(oai.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
            async for d in steps:
                if chat:
                    if d.text:
                        yield oai.sse(oai.chat_chunk(rid, model, created, {"content": d.text}))
                    if d.finish_reason:
                        yield oai.sse(oai.chat_chunk(rid, model, created, {}, d.finish_reason))
                elif d.text or d.finish_reason:
                    yield oai.sse(oai.completion_chunk(rid, model, created, d.text, d.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield oai.sse(oai.usage_chunk(rid, model, created, obj, run.usage()))
        except oai.OpenAIError as exc:  # the status line is gone: report in the stream, as OpenAI does
            yield oai.sse(exc.body())
        finally:
            await steps.aclose()
        yield oai.sse("[DONE]")

    async def _steps(self, run: _Run) -> AsyncIterator[_Delta | None]:
        """Admission, prefill, decode. Yields None once admitted (so the caller can still answer
        429 before streaming starts), then one _Delta per batch of new tokens.

        Whatever ends it (finish, error, rejection, the client leaving) its `finally` frees the
        request's KV blocks on the workers and its admission slot, exactly once."""
        m = self.metrics
        prefill_worker = prefill_ref = decode_worker = decode_gen = None
        status, first_at = "error", None
        try:
            admission: Admission = await self.router.admit.remote(
                run.request_id, len(run.prompt_ids), run.params.max_tokens,
                prefix_block_hashes(run.prompt_ids, self.info.block_size), run.tenant)
            if not admission.admitted:
                status = "rejected"
                m.rejections.labels(admission.reason).inc()
                raise oai.OpenAIError(
                    _REJECT_STATUS.get(admission.reason, 429),
                    _REJECT_MESSAGE.get(admission.reason,
                                        f"the server is at capacity ({admission.reason}); retry later"),
                    code=admission.reason, retry_after_s=admission.retry_after_s)
            m.admissions.inc()
            yield None

            prefill_worker = admission.prefill_worker
            handoff, generated, finish = None, [], None
            if prefill_worker is not None:  # disaggregated; without a prefill pool decode does it all
                for attempt in range(MAX_FAILOVERS + 1):
                    prefill_ref = self.info.handles[prefill_worker].prefill.remote(
                        run.request_id, run.prompt_ids, run.params)
                    try:
                        first = await self._call(prefill_ref, prefill_worker)
                        break
                    except _WorkerLost:  # nothing streamed yet: run the prompt on another worker
                        prefill_ref = None
                        prefill_worker = await self._replacement(run, prefill_worker, attempt)
                prefill_ref = None
                first_at = self._first_token(run, first.num_prompt_tokens, first.num_cached_tokens)
                run.output_tokens = len(first.token_ids)
                self.router.prefill_done.remote(run.request_id, first.num_prompt_tokens -
                                                first.num_cached_tokens, first.seconds)
                handoff, generated, finish = first.handoff, list(first.token_ids), first.finish_reason
                yield _Delta(first.token_ids, first.text, first.finish_reason)

            if finish is None:
                decode_worker = admission.decode_worker
                handed_off = len(generated)
                for attempt in range(MAX_FAILOVERS + 1):
                    # After a failover the new worker continues after what the client already has.
                    decode_gen = self.info.handles[decode_worker].generate.remote(
                        run.request_id, run.prompt_ids, run.params, handoff, list(generated))
                    try:
                        async for ref in decode_gen:
                            outs = await self._call(ref, decode_worker)
                            if first_at is None:
                                first_at = self._first_token(run, outs[0].num_prompt_tokens,
                                                             outs[0].num_cached_tokens)
                            elif run.output_tokens == handed_off:
                                m.handoff_seconds.observe(time.perf_counter() - first_at)
                            ids = [t for o in outs for t in o.new_token_ids]
                            generated += ids
                            run.output_tokens += len(ids)
                            finish = outs[-1].finish_reason
                            yield _Delta(ids, "".join(o.delta_text for o in outs), finish)
                        break
                    except _WorkerLost:
                        decode_gen = None
                        decode_worker = await self._replacement(run, decode_worker, attempt)
                decode_gen = None
                if finish is None:  # the worker stopped it (drain timeout): say so, never truncate
                    raise _stopped()
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if prefill_ref is not None:
                ray.cancel(prefill_ref)
                self.info.handles[prefill_worker].abort.remote(run.request_id)
            if decode_gen is not None:
                ray.cancel(decode_gen)
                self.info.handles[decode_worker].abort.remote(run.request_id)
            self.router.release.remote(run.request_id)
            self._observe_end(run, status, first_at)

    def _first_token(self, run: _Run, prompt_tokens: int, cached_tokens: int) -> float:
        """Record the first token's arrival (TTFT) and the prompt's counts; returns the time."""
        now = time.perf_counter()
        run.prompt_tokens, run.cached_tokens = prompt_tokens, cached_tokens
        self.metrics.ttft.observe(now - run.arrived)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.prefix_hit_tokens.inc(cached_tokens)
        return now

    async def _call(self, ref, worker_id: str) -> Any:
        """Await a worker call: a request the worker refused is a 400, a failure inside it a 500,
        and a worker that died or cannot be reached is `_WorkerLost` (the caller fails over)."""
        try:
            return await ref
        except ray.exceptions.RayTaskError as exc:
            cause = _unwrap(exc)
            if isinstance(cause, ValueError):
                raise oai.OpenAIError(400, str(cause)) from None
            if isinstance(cause, RequestAborted):
                raise _stopped() from None
            log.error("worker %s failed: %s", worker_id, exc)
            raise oai.OpenAIError(500, f"internal error on worker {worker_id}") from None
        except ray.exceptions.RayError as exc:
            log.error("worker %s lost: %s: %s", worker_id, type(exc).__name__, exc)
            raise _WorkerLost(worker_id) from exc

    async def _replacement(self, run: _Run, failed: str, attempt: int) -> str:
        """Another worker of `failed`'s role for this request (the router stops using `failed`)."""
        worker = await self.router.reroute.remote(run.request_id, failed)
        if worker is None or attempt >= MAX_FAILOVERS:
            raise oai.OpenAIError(503, f"worker {failed} is unavailable; retry",
                                  code="worker_unavailable", retry_after_s=1.0)
        log.warning("request %s moves from %s to %s", run.request_id, failed, worker)
        return worker

    def _observe_end(self, run: _Run, status: str, first_at: float | None) -> None:
        m = self.metrics
        m.requests.labels(status).inc()
        if status == "rejected":
            return
        end = time.perf_counter()
        m.generation_tokens.inc(run.output_tokens)
        if status == "ok":
            m.e2e.observe(end - run.arrived)
            if first_at is not None and run.output_tokens > 1:
                m.tpot.observe((end - first_at) / (run.output_tokens - 1))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application for `args["spec"]` (a ClusterSpec as a dict; the default spec if absent)."""
    spec = ClusterSpec.from_dict(args.get("spec"), source="serve args.spec")
    r = spec.router
    # Serve must hand every request to the ingress at once, so the router (not Serve's own queue)
    # decides what waits and what is turned away with a 429.
    ongoing = 2 * (r.max_concurrency + r.max_queue) + 64
    return Ingress.options(
        num_replicas=1, max_ongoing_requests=ongoing,
        # When Serve itself stops this replica (redeploy, KubeRay upgrade) it waits this long for
        # the streams in progress, as `pdcluster down` does (local_cluster.teardown).
        graceful_shutdown_timeout_s=r.drain_timeout_s,
        ray_actor_options={"num_cpus": 0, "resources": dict(HEAD_NODE)},
    ).bind(spec.to_dict())
