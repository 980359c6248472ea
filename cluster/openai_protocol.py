"""OpenAI wire format: request models with validation, response/chunk builders, and error bodies.

Every client-visible failure is an `OpenAIError`, rendered as {"error": {"message", "type", "param",
"code"}} with the status OpenAI uses (400 for any invalid request, 401, 404, 413, 429, 503).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdcluster.engine.sampling import SamplingParams

# OpenAI "type" per HTTP status
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions that cross processes (Serve's gRPC path does): keep every field.
        return (OpenAIError, (self.status, self.message, self.param, self.code, self.retry_after_s))

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extras).
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [("n", self.n != 1), ("presence_penalty", bool(self.presence_penalty)),
                ("frequency_penalty", bool(self.frequency_penalty))]

    def check_supported(self) -> None:
        for name, bad in self._unsupported():
            if bad:
                raise OpenAIError(400, f"'{name}' is not supported by this server", param=name,
                                  code="unsupported_parameter")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's params; `max_tokens` is the request's, already capped to the context."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                seed=self.seed, stop=tuple(stop), ignore_eos=self.ignore_eos)
        except ValueError as exc:
            msg = str(exc)
            first = msg.split(" ", 1)[0]
            raise OpenAIError(400, msg, param=first if first in type(self).model_fields else None,
                              code="invalid_value") from None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        fmt = (self.response_format or {}).get("type", "text")
        return [*super()._unsupported(), ("logprobs", bool(self.logprobs)),
                ("tools", bool(self.tools)), ("response_format", fmt != "text")]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [*super()._unsupported(), ("echo", self.echo), ("logprobs", self.logprobs is not None),
                ("suffix", bool(self.suffix))]

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (text or token ids); batches are not supported."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise OpenAIError(400, "only one prompt per request is supported", param="prompt",
                                  code="unsupported_parameter")
            p = p[0]
        if not p:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        return p


def parse(model: type[_Request], raw: bytes, max_bytes: int) -> Any:
    """Parse and validate a JSON body into `model`; any problem is an OpenAIError."""
    if len(raw) > max_bytes:
        raise OpenAIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}",
                          code="request_too_large")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    return validate(model, data)


def validate(model: type[_Request], data: dict[str, Any]) -> Any:
    """Validate a decoded request (HTTP JSON or a gRPC message as a dict); raises OpenAIError."""
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise OpenAIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                          code="invalid_value") from None
    req.check_supported()
    return req


# ---------------------------------------------------------------------------- API keys
def parse_api_keys(value: str) -> dict[str, str]:
    """API key -> tenant, from comma-separated `key` or `tenant:key` entries (unnamed keys get
    "key-<position>"); the tenant is what the router's per-key limits are keyed by. Keys may hold
    "=" (base64 padding) but not ":" or ","."""
    keys: dict[str, str] = {}
    for i, entry in enumerate(e.strip() for e in value.split(",")):
        if entry:
            tenant, sep, key = entry.partition(":")
            keys[key.strip() if sep else tenant] = tenant.strip() if sep else f"key-{i}"
    return keys


def tenant_for(authorization: str | None, keys: dict[str, str]) -> str | None:
    """The tenant of an `Authorization: Bearer <key>` header; None when no keys are configured."""
    if not keys:
        return None
    key = (authorization or "").removeprefix("Bearer ").strip()
    if key not in keys:
        raise OpenAIError(401, "missing or invalid API key", code="invalid_api_key")
    return keys[key]


# ---------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_completion(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                    use: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
               use: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(request_id: str, model: str, created: int, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, created: int, obj: str,
                use: dict[str, Any]) -> dict[str, Any]:
    """The final chunk of a stream with stream_options.include_usage: no choices, just usage."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "pdcluster"}]}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
