"""Ray Serve ingress: the OpenAI HTTP API and the gRPC Inference service over the PD cluster.

It authenticates, validates and tokenizes each request, checks it against the model's context once,
admits its n choices through the orchestrator (orchestrator.py), and hands their deltas to the
renderer (responses.py) for JSON, SSE or gRPC.
"""
import asyncio
import copy
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...actors.controller import get_or_create_controller
from ...actors.names import HEAD_NODE
from ..launch import ray_env
from ..policy.placement import choices_blocks_needed, longest_choices
from ..spec import ClusterSpec
from . import browser_origins, grpc_service, responses_api
from . import openai_protocol as oai
from .browser_origins import BrowserOrigins
from .chat_output import ChatOutput
from .chat_prompt import ChatFormat, PreparedChat, prepare_chat
from .grpc_service import Undecodable
from .metrics import CONTENT_TYPE, CountResponses, ServingMetrics
from .openapi import openapi_document
from .orchestrator import Delta, Orchestrator, RequestRecord, merge_choices
from .responses import (SSE_HEADERS, ClosingStreamingResponse, ResponseRenderer, choices_usage,
                        error_response)

log = logging.getLogger(__name__)

ROUTER_TIMEOUT_S = 10.0
ROUTER_RESTART_WAIT_S = 25.0  # under Serve's health-check timeout (30 s)
LEASE_RENEW_S = 1.0  # well inside the router's LEASE_TTL_S
GRPC_HEALTH_REFRESH_S = 1.0  # how stale gRPC Health's answers may be
# Threads that validate request bodies, apart from the loop's default executor (templating and
# tokenizing): a body's grammar check may wait seconds (structured_output.PARSE_BUDGET_S).
VALIDATION_THREADS = 4
# HTTP status of an OpenAIError -> gRPC status code
_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
               429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(BrowserOrigins)
app.add_middleware(CountResponses)   # outermost: counts CORS preflights' answers too


def _api_keys(env_name: str | None) -> dict[str, str]:
    """key -> tenant from the env var the spec names (the spec never holds keys itself)."""
    if not env_name:
        return {}
    try:
        keys = oai.parse_api_keys(os.environ.get(env_name, ""))
    except ValueError as exc:
        raise RuntimeError(f"${env_name}: {exc}") from None
    if not keys:
        raise RuntimeError(f"serve.api_keys_env names {env_name!r}, but that variable holds no keys")
    return keys


def _provable_prompt_bytes(tokenizer: Any, context: int) -> int:
    """Bytes of text that cannot fit `context` tokens whatever they say: no token stands for more
    bytes than the longest vocabulary entry's spelling (byte-level and byte-fallback spellings are
    never shorter than the bytes they stand for)."""
    hf = tokenizer.hf
    longest = max(len(t.encode()) for t in hf.convert_ids_to_tokens(list(range(len(hf)))) if t)
    return context * longest


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in a chat's messages (contents, tool calls, their names): a
    lower bound on the text the template renders (a participant's `name` and an assistant's
    `reasoning_content`, which many templates leave out, are not counted)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_text_bytes(v) for k, v in value.items()
                   if not (k in ("name", "reasoning_content") and "role" in value))
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


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
    response = error_response(oai.OpenAIError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    return response


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(oai.OpenAIError(500, "internal server error"))


def _grpc_response_format(fmt) -> dict[str, Any]:
    """inference.proto's ResponseFormat as chat's response_format."""
    if fmt.type != "json_schema":
        return {"type": fmt.type or "text"}
    try:
        schema = json.loads(fmt.json_schema or "{}")
    except (ValueError, RecursionError) as exc:
        raise oai.OpenAIError(400, f"response_format.json_schema is not valid JSON: {exc}",
                              param="response_format.json_schema") from None
    return {"type": "json_schema", "json_schema": {"name": "grpc", "schema": schema}}


@serve.deployment
@serve.ingress(app)
class Ingress:
    async def __init__(self, spec: dict) -> None:
        from ...engine.tokenizer import Tokenizer
        from ...engine.weights import resolve_model_path

        self._validation = ThreadPoolExecutor(VALIDATION_THREADS, thread_name_prefix="validate")
        self.spec = ClusterSpec.from_dict(spec)
        wrong_proxy = ray_env.mismatch(self.spec)
        if wrong_proxy:
            raise RuntimeError(wrong_proxy)
        self.api_keys = _api_keys(self.spec.serve.api_keys_env)  # bad keys fail before anything starts
        browser_origins.allow(self.spec.serve.cors_allowed_origins)
        controller = get_or_create_controller(self.spec)
        # A redeploy (serve deploy, a KubeRay serveConfigV2 update) finds the cluster running: its
        # router takes the new settings; a change that needs new workers fails this replica, naming it.
        await controller.reconfigure.remote(self.spec.to_dict())
        self.info = await controller.ready.remote()
        self.router = self.info.router
        model_path = resolve_model_path(self.spec.model.path)
        self.tokenizer = await asyncio.to_thread(Tokenizer, model_path)
        self.max_prompt_bytes = self.spec.serve.max_prompt_bytes or await asyncio.to_thread(
            _provable_prompt_bytes, self.tokenizer, self.info.max_model_len)
        self.chat_format = await asyncio.to_thread(
            ChatFormat.for_model, model_path, getattr(self.tokenizer.hf, "chat_template", None),
            self.spec.serve.reasoning_parser, self.spec.serve.tool_call_parser)
        self._token_texts: dict[int, str] = {}   # token id -> its text, for logprobs
        self.responses = ResponseRenderer(self.info.model_name, int(time.time()), self._token_text,
                                          self._token_bytes)
        self.metrics = ServingMetrics()
        # This replica's requests are leased from the router under this id: if the replica dies
        # (SIGKILL, Serve's shutdown timeout) the lease runs out and the router frees their slots.
        owner = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.orchestrator = Orchestrator(self.info, self.metrics, owner=owner)
        self._lease = asyncio.create_task(self._renew_lease_forever())
        serve_spec = self.spec.serve
        # The replica this one replaces (a redeploy) keeps the port until its streams finish.
        self.grpc_health = grpc_service.Health(self._ready)
        await self.grpc_health.refresh()   # the first answer is already the replica's state
        try:
            self.grpc_server = await grpc_service.start_server(
                self, self.grpc_health, serve_spec.http_host, serve_spec.grpc_port,
                serve_spec.max_body_bytes, wait_s=self.spec.router.drain_timeout_s + 5)
        except BaseException:
            self._lease.cancel()
            raise
        self._grpc_health_refresh = asyncio.create_task(self._refresh_grpc_health_forever())
        log.info("ingress ready for %s (%d workers)", self.info.model_name, len(self.info.workers))

    async def __del__(self) -> None:
        """Serve stops this replica: stop taking gRPC calls, give those running the drain timeout."""
        server = getattr(self, "grpc_server", None)
        if server is not None:
            self._grpc_health_refresh.cancel()
            try:   # NOT_SERVING from now on (a stuck watcher is not waited on for long)
                await asyncio.wait_for(self.grpc_health.enter_graceful_shutdown(), 5.0)
            except TimeoutError:
                log.warning("gRPC health: a watcher held the shutdown's NOT_SERVING back")
            await server.stop(self.spec.router.drain_timeout_s)

    async def _renew_lease_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.orchestrator.renew_lease(), ROUTER_TIMEOUT_S)
            except (TimeoutError, ray.exceptions.RayError) as exc:  # restarting: next round
                log.warning("lease renewal failed: %s", exc)
            await asyncio.sleep(LEASE_RENEW_S)

    async def _refresh_grpc_health_forever(self) -> None:
        """Keeps the gRPC Health service's answers and watchers current with this replica's
        readiness."""
        while True:
            try:
                await self.grpc_health.refresh()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("gRPC health refresh failed")
            await asyncio.sleep(GRPC_HEALTH_REFRESH_S)

    async def check_health(self) -> None:
        """Serve's replica health check: the router answers. Ray restarts a router whose process
        died and calls wait for it, so a restart fails no check (replacing this replica for it
        would kill the streams it serves); a router gone for good does."""
        await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_RESTART_WAIT_S)

    # ------------------------------------------------------------------ HTTP routes
    @app.api_route("/health", methods=["GET", "HEAD"])   # load balancers probe with either
    async def health(self) -> Response:
        body = await self._readiness()
        return JSONResponse(body, 200 if body["status"] == "ok" else 503)

    async def _readiness(self) -> dict[str, Any]:
        """Whether this replica can serve ("status": "ok"), as /health and gRPC's Health answer."""
        try:
            snap = await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            return {"status": "unavailable", "detail": f"router: {exc}"}
        if snap.draining:  # load balancers stop sending here; in-flight requests still finish
            return {"status": "draining", "in_flight": snap.in_flight}
        roles = {w.info.role for w in snap.workers if w.healthy}
        if roles != ({"decode"} if self.spec.colocated else {"prefill", "decode"}):
            return {"status": "unavailable", "detail": "no healthy worker in a pool"}
        return {"status": "ok", "in_flight": snap.in_flight, "queued": snap.queued}

    async def _ready(self) -> bool:
        return (await self._readiness())["status"] == "ok"

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus(self) -> Response:
        try:
            snap = await asyncio.wait_for(self.router.snapshot.remote(), ROUTER_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError):
            snap = None
        self.metrics.set_cluster(snap)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/openapi.json", methods=["GET", "HEAD"])
    async def openapi(self) -> Response:
        return JSONResponse(openapi_document(self.info.model_name, self.info.vocab_size,
                                             bool(self.api_keys)))

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(self, request: Request) -> Response:
        try:
            self._tenant(request.headers.getlist("authorization"))
        except oai.OpenAIError as exc:
            return error_response(exc)
        return JSONResponse(oai.model_list(self.info.model_name, self.responses.model_created))

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(self, model: str, request: Request) -> Response:
        try:
            self._tenant(request.headers.getlist("authorization"))
            if model != self.info.model_name:
                raise oai.OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                                      f"{self.info.model_name!r}", param="model", code="model_not_found")
        except oai.OpenAIError as exc:
            return error_response(exc)
        return JSONResponse(oai.model_entry(self.info.model_name, self.responses.model_created))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            req, tenant = await self._parse(request, oai.ChatCompletionRequest)
            rec, out = await self._chat_record("chatcmpl", req, tenant)
        except oai.OpenAIError as exc:
            return error_response(exc)
        return await self._respond(rec, req, out)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            req, tenant = await self._parse(request, oai.CompletionRequest)
            rec = self._new_record("cmpl", await self._prompt_ids(req), req, tenant)
        except oai.OpenAIError as exc:
            return error_response(exc)
        return await self._respond(rec, req, None)

    @app.post("/v1/responses")
    async def create_response(self, request: Request) -> Response:
        """OpenAI's Responses API, run as a chat (responses_api.py); nothing is stored."""
        req = None
        try:
            req, tenant = await self._responses_request(request)
            rec, out = await self._chat_record("resp", req.chat, tenant)
            recs, outs, choices = await self._start(rec, 1, out)
        except oai.OpenAIError as exc:
            return error_response(req.error(exc) if req is not None else exc)
        render = responses_api.ResponseRender(
            req, rec, out, self.info.model_name,
            lambda entries: self.responses.logprobs(True, entries)["content"],
            lambda: choices_usage(recs, outs))
        if req.chat.stream:
            return ClosingStreamingResponse(render.sse(choices), media_type="text/event-stream",
                                            headers=SSE_HEADERS)
        return await render.json(choices)

    @app.post("/v1/responses/input_tokens")
    async def count_input_tokens(self, request: Request) -> Response:
        """The prompt tokens a Responses API request would take (its instructions, input and
        tools as the chat template renders them), as OpenAI's input token count answers."""
        req = None
        try:
            req, _ = await self._responses_request(request)
            # counted whatever the context: a client asks to learn whether its input fits
            chat = await asyncio.to_thread(self._prepare_chat, req.chat)
        except oai.OpenAIError as exc:
            return error_response(req.error(exc) if req is not None else exc)
        return JSONResponse({"object": "response.input_tokens", "input_tokens": len(chat.prompt_ids)})

    @app.api_route("/v1/responses/{path:path}", methods=["GET", "HEAD", "POST", "DELETE"])
    async def stored_response(self, path: str, request: Request) -> Response:
        """Retrieving, deleting or cancelling a response, or listing its input items: there is
        none to find, since none is stored."""
        try:
            self._tenant(request.headers.getlist("authorization"))
        except oai.OpenAIError as exc:
            return error_response(exc)
        response_id = path.split("/", 1)[0]
        if path == "input_tokens":   # the counting route is POST's
            response = error_response(oai.OpenAIError(405, "Method Not Allowed"))
            response.headers["Allow"] = "POST"
            return response
        if not response_id.startswith("resp_"):
            return error_response(oai.OpenAIError(404, "Not Found"))
        return error_response(oai.OpenAIError(
            404, f"no response {response_id[:100]!r}: this server stores no responses (each is "
            "answered once, as with store: false)", param="response_id", code="response_not_found"))

    # ------------------------------------------------------------------ gRPC
    async def Generate(self, request, grpc_context) -> AsyncIterator[Any]:
        """inference.proto's server-streaming Generate (the replica's own gRPC server)."""
        try:
            metadata = grpc_context.invocation_metadata()
            tenant = self._tenant([v for k, v in metadata if k == "authorization"])
            if isinstance(request, Undecodable):
                raise oai.OpenAIError(400, f"the request is not a GenerateRequest: {request.error}")
            rec, out, n = await self._grpc_record(request, tenant)
            recs, outs, choices = await self._start(rec, n, out)
        except oai.OpenAIError as exc:
            grpc_context.set_code(_GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
            retry = f" (retry after {exc.headers()['Retry-After']}s)" if exc.retry_after_s else ""
            grpc_context.set_details(exc.message + retry)
            if exc.retry_after_s:   # as inference.proto promises
                grpc_context.set_trailing_metadata((("retry-after", exc.headers()["Retry-After"]),))
            raise
        try:
            async for message in self.responses.grpc(recs, outs, choices):
                yield message
        except oai.OpenAIError as exc:
            grpc_context.set_code(_GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(exc.message)
            raise

    async def _grpc_record(self, request, tenant: str | None,
                           ) -> tuple[RequestRecord, ChatOutput | None, int]:
        """The request's record, its chat parser (None for a prompt) and its number of choices."""
        inputs = [bool(request.prompt), bool(request.messages), bool(request.prompt_token_ids)]
        if sum(inputs) != 1:
            raise oai.OpenAIError(400, "set exactly one of prompt, messages, prompt_token_ids")
        data: dict[str, Any] = {"model": request.model or None, "stop": list(request.stop) or None,
                                "ignore_eos": request.ignore_eos, "max_tokens": None}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "n"):
            if request.HasField(name):
                data[name] = getattr(request, name)
        if request.logit_bias:
            data["logit_bias"] = {str(t): b for t, b in request.logit_bias.items()}
        if request.min_tokens:
            data["min_tokens"] = request.min_tokens
        if request.HasField("response_format"):
            data["response_format"] = _grpc_response_format(request.response_format)
        try:
            data.update(grpc_service.chat_fields(request))
        except ValueError as exc:
            raise oai.OpenAIError(400, str(exc)) from None
        if request.messages:
            data["messages"] = [grpc_service.chat_message(m) for m in request.messages]
            if request.HasField("logprobs"):
                data["logprobs"], data["top_logprobs"] = True, request.logprobs
            req = await self._validated(oai.validate, oai.ChatCompletionRequest, data)
            self._check_model(req.model)
            return *await self._chat_record("grpc", req, tenant), req.n
        data["prompt"] = request.prompt or list(request.prompt_token_ids)
        if request.HasField("logprobs"):
            data["logprobs"] = request.logprobs
        req = await self._validated(oai.validate, oai.GrpcCompletionRequest, data)
        self._check_model(req.model)
        return self._new_record("grpc", await self._prompt_ids(req), req, tenant), None, req.n

    # ------------------------------------------------------------------ request plumbing
    async def _parse(self, request: Request, model: type) -> tuple[Any, str | None]:
        """Authenticate, read (within the size limit) and validate a request body for this model."""
        tenant = self._tenant(request.headers.getlist("authorization"))
        limit = self.spec.serve.max_body_bytes
        req = await self._validated(oai.parse, model, await _read_body(request, limit), limit)
        self._check_model(req.model)
        return req, tenant

    async def _responses_request(self, request: Request,
                                 ) -> tuple[responses_api.ResponsesRequest, str | None]:
        """Authenticate, read and validate a Responses API body (as the chat request it means)."""
        tenant = self._tenant(request.headers.getlist("authorization"))
        limit = self.spec.serve.max_body_bytes
        data = oai.decode_body(await _read_body(request, limit), limit)
        req = await self._validated(responses_api.parse, data)
        self._check_model(req.chat.model)
        return req, tenant

    async def _validated(self, validate: Any, *args: Any) -> Any:
        """`validate(*args)` off the event loop: it checks grammars, which can take seconds."""
        return await asyncio.get_running_loop().run_in_executor(self._validation, validate, *args)

    def _tenant(self, authorization: list[str]) -> str | None:
        return oai.tenant_for(authorization, self.api_keys)

    # Tokenizing and templating run in a thread, never on the event loop every stream shares, and
    # only for text that could fit the context (`_check_prompt_bytes`).
    async def _chat_record(self, prefix: str, req: oai.ChatCompletionRequest,
                           tenant: str | None) -> tuple[RequestRecord, ChatOutput]:
        """A chat's record (its prompt rendered, a required or named tool choice as the grammar
        the engine decodes under) and the parser of its answer."""
        chat = await asyncio.to_thread(self._prepare_chat, req)
        rec = self._new_record(prefix, chat.prompt_ids, req, tenant)
        if chat.constraint is not None:
            if rec.params.structured_output is not None:
                raise oai.OpenAIError(400, "response_format and tool_choice cannot both constrain the "
                                      "answer", param="tool_choice", code="unsupported_parameter")
            rec.params = dataclasses.replace(rec.params, structured_output=chat.constraint)
        if chat.output.tools is not None or chat.output.reasoning is not None:
            # the parsers read the model's markers, and some are special tokens (Kimi-K2's, as vLLM notes)
            rec.params = dataclasses.replace(rec.params, skip_special_tokens=False)
        return rec, chat.output

    def _prepare_chat(self, req: oai.ChatCompletionRequest) -> PreparedChat:
        self._check_prompt_bytes(_text_bytes(req.chat(self.chat_format.native_tools)), "messages")
        return prepare_chat(self.tokenizer, req, self.chat_format, self.max_prompt_bytes)

    async def _prompt_ids(self, req: oai.CompletionRequest) -> list[int]:
        prompt = req.single_prompt()
        if not isinstance(prompt, str):
            return list(prompt)
        self._check_prompt_bytes(len(prompt.encode()), "prompt")
        return await asyncio.to_thread(self.tokenizer.encode, prompt)

    def _check_prompt_bytes(self, size: int, param: str) -> None:
        if size > self.max_prompt_bytes:
            raise oai.OpenAIError(400, f"the prompt is {size} bytes; this server takes at most "
                                  f"{self.max_prompt_bytes} (the model's context is "
                                  f"{self.info.max_model_len} tokens)", param=param,
                                  code="context_length_exceeded")

    def _check_model(self, model: str | None) -> None:
        if model and model != self.info.model_name:
            raise oai.OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                                  f"{self.info.model_name!r}", param="model", code="model_not_found")

    def _new_record(self, prefix: str, ids: list[int], req: Any, tenant: str | None) -> RequestRecord:
        """Checks the prompt against the model (vocabulary, context) and fixes max_tokens."""
        vocab, context = self.info.vocab_size, self.info.max_model_len
        if not ids:
            raise oai.OpenAIError(400, "the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise oai.OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        room = context - len(ids)
        if room < 1:
            raise oai.OpenAIError(400, f"the prompt is {len(ids)} tokens; this model's context is "
                                  f"{context} tokens", param="messages" if prefix in ("chatcmpl", "resp")
                                  else "prompt", code="context_length_exceeded")
        wanted = req.requested_max_tokens()
        if wanted is not None and wanted > room:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise oai.OpenAIError(400, f"prompt ({len(ids)} tokens) + {name} ({wanted}) exceeds "
                                  f"the context of {context} tokens", param=name,
                                  code="context_length_exceeded")
        n = getattr(req, "n", 1) or 1
        params = req.sampling_params(wanted or self._default_max_tokens(len(ids), room, n))
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise oai.OpenAIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias",
                                  code="invalid_value")
        return RequestRecord(f"{prefix}-{uuid.uuid4().hex}", ids, params, tenant)

    def _default_max_tokens(self, prompt_len: int, room: int, n: int) -> int:
        """A request without max_tokens runs to the end of the context, or of what the smallest
        decode worker's KV cache holds where that is less (a decode worker refuses a request it
        cannot hold whole, and placement may pick any; vLLM would not start with such a context);
        n > 1 such choices, each to the longest that lets all n hold their KV in the decode pool
        at once (else `_choices` refuses them: one choice needs more than the pool)."""
        smallest = min((w.num_total_blocks for w in self.info.workers.values() if w.role == "decode"),
                       default=0)
        whole = longest_choices(prompt_len, 1, smallest, self.info.block_size)
        cap = min(room, whole) if whole >= 1 else room
        if n == 1:
            return cap
        longest = longest_choices(prompt_len, n, self._decode_pool_blocks(), self.info.block_size)
        return min(cap, longest) if longest >= 1 else cap

    def _decode_pool_blocks(self) -> int:
        return sum(w.num_total_blocks for w in self.info.workers.values() if w.role == "decode")

    def _token_text(self, token_id: int) -> str:
        """A token's text as logprobs show it (special tokens included; part of a character as
        "bytes:\\x..")."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = oai.token_spelling(self._token_bytes(token_id))
        return text

    def _token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    async def _respond(self, rec: RequestRecord, req: Any, out: ChatOutput | None) -> Response:
        """`out`: a chat answer's parser (None for completions)."""
        try:
            recs, outs, choices = await self._start(rec, req.n, out)
        except oai.OpenAIError as exc:
            return error_response(exc)
        if req.stream:
            return ClosingStreamingResponse(self.responses.sse(recs, outs, choices, req.include_usage,
                                                                   req.continuous_usage),
                                            media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.responses.json(recs, outs, choices)

    async def _start(self, rec: RequestRecord, n: int, out: ChatOutput | None,
                     ) -> tuple[list[RequestRecord], list[ChatOutput | None],
                                AsyncIterator[tuple[int, Delta]]]:
        """Admit a request's n choices; their records, parsers and merged (index, delta) steps.
        With n > 1 the choices run as n requests, the first alone until its prompt is computed:
        the others find its blocks in the prefix cache of the worker that computed it (the router
        places them by prefix affinity). A rejection is raised, with nothing left held."""
        recs, outs = self._choices(rec, n, out)
        steps = [self.orchestrator.run(r) for r in recs]
        first: Delta | None = None
        try:
            await self._admitted(steps[0])
            if len(steps) > 1:
                first = await anext(steps[0], None)
                await asyncio.gather(*(self._admitted(s) for s in steps[1:]))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in steps), return_exceptions=True)
            raise
        return recs, outs, merge_choices(steps, first)

    def _choices(self, rec: RequestRecord, n: int,
                 out: ChatOutput | None) -> tuple[list[RequestRecord], list[ChatOutput | None]]:
        """The records of a request's n choices (the first is `rec`; a seed gives choice i seed + i,
        as vLLM does) and a parser per choice; n the admission could never run at once is a 400."""
        if n == 1:
            return [rec], [out]
        limit = self.spec.router.max_concurrency
        if n > limit:
            raise oai.OpenAIError(400, f"n={n} choices cannot run at once: this server runs at most "
                                  f"{limit} requests at a time", param="n", code="invalid_value")
        needed = choices_blocks_needed(len(rec.prompt_ids), rec.params.max_tokens, n, self.info.block_size)
        pool = self._decode_pool_blocks()
        if needed > pool:
            raise oai.OpenAIError(400, f"n={n} choices of up to {rec.params.max_tokens} tokens need "
                                  f"{needed} KV blocks at once; the decode pool has {pool}",
                                  param="n", code="invalid_value")
        recs = [rec]
        for i in range(1, n):
            params = rec.params
            if params.seed is not None:
                params = dataclasses.replace(params, seed=params.seed + i)
            recs.append(RequestRecord(f"{rec.request_id}-{i}", rec.prompt_ids, params, rec.tenant))
        return recs, [out] + [copy.deepcopy(out) for _ in range(1, n)]

    @staticmethod
    async def _admitted(steps: AsyncIterator[Delta | None]) -> None:
        """Advance a fresh `_steps` past admission (raising its rejection), closing it on failure."""
        try:
            await steps.__anext__()
        except BaseException:
            await steps.aclose()
            raise


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application for `args["spec"]` (a ClusterSpec as a dict; the default spec if absent)."""
    spec = ClusterSpec.from_dict(args.get("spec"), source="serve args.spec")
    r = spec.router
    # Serve must hand every request to the ingress at once, so the router (not Serve's own queue)
    # decides what waits and what is turned away with a 429.
    ongoing = 2 * (r.max_concurrency + r.max_queue) + 64
    return Ingress.options(
        # Serve's proxy (or, behind HAProxy, the replica's own HTTP server) counts a request as
        # queued until it is assigned to the replica, which takes a moment: a burst of simultaneous
        # requests is all "queued" at once, and a small bound answers part of it 503 though the
        # replica would take it (Ray's router says so). The same bound as the replica's keeps the
        # router the one that turns requests away; beyond it Serve answers at once (HTTP 503, gRPC
        # UNAVAILABLE) instead of queueing without bound.
        num_replicas=1, max_ongoing_requests=ongoing, max_queued_requests=ongoing,
        # When Serve itself stops this replica (redeploy, KubeRay upgrade) it waits this long for
        # the streams in progress, as `pdcluster down` does (local_cluster.teardown).
        graceful_shutdown_timeout_s=r.drain_timeout_s,
        ray_actor_options={"num_cpus": 0, "resources": dict(HEAD_NODE)},
    ).bind(spec.to_dict())
