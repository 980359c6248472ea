"""OpenAI wire format: request models with validation, response/chunk builders, and error bodies."""
from __future__ import annotations

import codecs
import hmac
import json
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from ...engine.outputs import TokenLogprob
from ...engine.sampling import MAX_LOGPROBS, MIN_REPETITION_PENALTY, SamplingParams, StructuredOutput
from ...engine.structured_output import GrammarChecksBusy, unenforceable
from . import tool_calls
from .tool_calls import Tool, ToolCall, ToolChoice

# Every client-visible failure is an `OpenAIError`, rendered as {"error": {"message", "type", "param",
# "code"}} with the status OpenAI uses (400 for any invalid request, 401, 404, 413, 415, 429, 503).
# Validation is strict (JSON types as OpenAI documents them, no "1" for 1) and bounds every value the
# engine would otherwise choke on, so no request body can fail a worker's batch.

# OpenAI "type" per HTTP status
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
INT64_MIN, UINT64_MAX, INT32_MAX = -(1 << 63), (1 << 64) - 1, (1 << 31) - 1
MAX_STOP = 16  # SamplingParams' limit, declared here so the OpenAPI document shows it
_Stop = Annotated[str, Field(min_length=1)]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON has one number type: 2.0 is the integer 2 (as JSON Schema says), but 2.5, "2" and true are not.
Int = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX), BeforeValidator(_integral)]  # torch's range


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


Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(_integral)]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # "schema" would shadow BaseModel.schema
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    # llama.cpp's and some providers' way to pin json_object to a schema: refused, not dropped
    schema_: SkipJsonSchema[Any] = Field(None, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _no_schema_beside_type(cls, value: Any) -> None:
        if value is not None:
            raise PydanticCustomError("unsupported", "not supported: a schema goes in "
                                      "response_format.json_schema.schema, with type json_schema")

    def structured_output(self) -> StructuredOutput | None:
        """The engine's constraint; OpenAIError 400 for a schema the grammar library refuses."""
        try:
            return self._structured_output()
        except GrammarChecksBusy as exc:
            raise grammar_checks_busy(exc) from None
        except RecursionError:
            raise OpenAIError(400, "response_format's schema nests too deeply",
                              param="response_format.json_schema.schema", code="invalid_value") from None

    def _structured_output(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise OpenAIError(400, "response_format json_schema needs a 'json_schema' object",
                              param="response_format.json_schema")
        schema = self.json_schema.schema_ if self.type == "json_schema" else None
        if self.type == "json_schema" and self.json_schema.strict and (problem := unenforceable(schema)):
            # strict asks that the output match: refused where the grammar would not hold it to that
            raise OpenAIError(400, f"strict response_format: {problem}",
                              param="response_format.json_schema.schema", code="invalid_value")
        try:
            if self.type == "json_object":
                return StructuredOutput("json_object")
            return StructuredOutput("json_schema", json.dumps(schema or {"type": "object"}))
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="response_format.json_schema.schema",
                              code="invalid_value") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False          # a last chunk with the usage of every choice
    # vLLM's: every chunk carries its choice's usage so far (vLLM wants include_usage too; here it
    # asks for the per-chunk usage on its own)
    continuous_usage_stats: bool = False


# A refused field's values that ask for nothing: listed, or a predicate of (value, request body)
OffValues = tuple | Callable[[Any, dict[str, Any]], bool]


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _at_least_1(value: Any, body: dict[str, Any]) -> bool:
    return _number(value) and value >= 1


def _at_most_0(value: Any, body: dict[str, Any]) -> bool:
    return _number(value) and value <= 0


def _zero(value: Any, body: dict[str, Any]) -> bool:
    return _number(value) and value == 0


def _one(value: Any, body: dict[str, Any]) -> bool:
    return _number(value) and value == 1


def _no_other_limit(value: Any, body: dict[str, Any]) -> bool:
    """llama.cpp's n_predict asks nothing new when negative (no limit) or equal to the limit the
    request sets itself (clients send both): max_completion_tokens if set, else max_tokens."""
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    return _number(value) and (value < 0 or (_number(limit) and value == limit))


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extras).
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: TopK | None = None  # vLLM extension
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # vLLM extension
    seed: Seed | None = None
    stop: _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: PositiveInt = 1
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2,
                                             allow_inf_nan=False)  # vLLM extension
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=1024)
    min_tokens: Annotated[int, Field(ge=0), BeforeValidator(_integral)] = 0  # vLLM extension
    user: str | None = None
    response_format: ResponseFormat | None = None  # on completions too, as vLLM takes it
    _structured: StructuredOutput | None = PrivateAttr(default=None)  # compiled once, when validated

    # Fields of OpenAI's API and vLLM's that would change the answer and that this server does not
    # implement: refused when set, where other unknown fields are ignored. name -> (what to do
    # instead, the values that ask for nothing: null always does)
    # Fields OpenAI declares nullable whose null means the default (the `openai` client sends null for
    # an argument given as None): validated as if left out.
    NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = ("stream", "n", "ignore_eos", "min_tokens")

    REFUSED: ClassVar[dict[str, tuple[str, OffValues]]] = {
        **{f"guided_{k}": ("use response_format", ()) for k in ("json", "regex", "choice", "grammar")},
        "structured_outputs": ("use response_format", ({},)),
        "prediction": ("predicted outputs are not supported", ()),
        "stop_token_ids": ("use stop strings", ([],)),
        "bad_words": ("use logit_bias", ([],)), "allowed_token_ids": ("use logit_bias", ()),
        "include_stop_str_in_output": ("the stop string is never included", (False,)),
        "skip_special_tokens": ("special tokens are always skipped", (True,)),
        "spaces_between_special_tokens": ("not supported", (True,)),
        "prompt_logprobs": ("prompt logprobs are not supported", ()),
        "use_beam_search": ("beam search is not supported", (False,)),
        "length_penalty": ("beam search is not supported", (1, 1.0)),
        "truncate_prompt_tokens": ("prompts are never truncated; a long one is a 400", ()),
        "guided_whitespace_pattern": ("use response_format", ()),
        "logits_processors": ("custom logits processors are not supported", ([],)),
        "return_tokens_as_token_ids": ("logprobs always give tokens as text", (False,)),
        "return_token_ids": ("token ids are not returned; use logprobs", (False,)),
        "priority": ("requests are admitted in arrival order", (0,)),
        "thinking_token_budget": ("not supported", ()),
        # other servers' samplers and limits (llama.cpp, TGI, text-generation-webui), refused where
        # set to anything but a value that leaves the answer as it is: the values those servers
        # take as off, which their clients send by default
        **{name: ("this sampler is not supported", off) for name, off in (
            ("typical_p", _at_least_1), ("tfs_z", _at_least_1), ("top_a", _at_most_0),
            ("mirostat", _zero), ("dry_multiplier", _at_most_0), ("xtc_probability", _at_most_0),
            ("top_n_sigma", _at_most_0), ("dynatemp_range", _at_most_0))},
        "repeat_penalty": ("use repetition_penalty", _one),
        "n_predict": ("use max_tokens", _no_other_limit),
        "n_probs": ("use logprobs", _at_most_0), "top_n_tokens": ("use logprobs", _at_most_0),
        "grammar": ("use response_format", ("",)), "json_schema": ("use response_format", ())}

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in cls.NULL_IS_DEFAULT):
            return {k: v for k, v in data.items() if not (v is None and k in cls.NULL_IS_DEFAULT)}
        return data

    def _unsupported(self) -> list[tuple[str, bool]]:
        return []

    @classmethod
    def refuse_unimplemented(cls, data: dict[str, Any]) -> None:
        """A field of `REFUSED` set in the body to a value that asks for something is a 400 naming
        it. What asks for nothing: the values listed, or those a predicate of (value, body) takes."""
        for name, (instead, nothing) in cls.REFUSED.items():
            value = data.get(name)
            if value is None:
                continue
            if callable(nothing):
                off = nothing(value, data)
            else:
                off = any(value == v and type(value) is type(v) for v in nothing)
            if not off:
                raise OpenAIError(400, f"'{name}' is not supported by this server: {instead}", param=name,
                                  code="unsupported_parameter")

    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        """logit_bias with its keys (token ids as JSON strings) as ints; the ingress checks the
        vocabulary."""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.strip().isascii() and key.strip().isdigit() and len(key.strip()) <= 12):
                raise OpenAIError(400, f"logit_bias keys must be token ids, got {key!r}",
                                  param="logit_bias", code="invalid_value")
            out.append((int(key), bias))
        return tuple(out)

    def engine_logprobs(self) -> int | None:
        """How many alternatives per token the engine reports (None: no logprobs)."""
        return None

    def structured_output(self) -> StructuredOutput | None:
        return self._structured

    def check_supported(self) -> None:
        for name, bad in self._unsupported():
            if bad:
                raise OpenAIError(400, f"'{name}' is not supported by this server", param=name,
                                  code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed when stream is true",
                              param="stream_options", code="invalid_value")
        self._structured = self.response_format.structured_output() if self.response_format else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's params; `max_tokens` is the request's, already capped to the context."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                seed=self.seed, stop=tuple(stop), ignore_eos=self.ignore_eos,
                logprobs=self.engine_logprobs(), presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0, logit_bias=self.logit_bias_ids(),
                min_tokens=self.min_tokens, structured_output=self.structured_output())
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
    # the schema says what `_has_content` checks
    model_config = ConfigDict(extra="ignore", json_schema_extra={"anyOf": [
        {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        {"required": ["role", "tool_calls"], "properties": {
            "role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}}],
        "if": {"required": ["reasoning_content"], "properties": {"reasoning_content": {"type": "string"}}},
        "then": {"properties": {"role": {"const": "assistant"}}}})
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a list of parts has at least one, as OpenAI's schema says
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None                    # the participant's name, passed to the template
    tool_calls: list[ToolCall] | None = None   # assistant
    tool_call_id: str | None = None            # tool
    # assistant: its thinking, for templates that keep it in the history (Qwen3 within a tool loop)
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # as OpenAI: only an assistant message that makes tool calls may leave out its content
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError(
                "missing", "a message of role '{role}' needs content"
                + " or tool_calls" * (self.role == "assistant"), {"role": self.role})
        if self.reasoning_content is not None and self.role != "assistant":
            raise PydanticCustomError("invalid", "only assistant messages carry reasoning_content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):   # parts one per line, as vLLM joins them
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    REFUSED: ClassVar[dict[str, tuple[str, OffValues]]] = {
        **_Request.REFUSED, "functions": ("use tools", ([],)),
        "function_call": ("use tool_choice", ("none",)),
        "modalities": ("this server answers in text only", (["text"],)),
        "audio": ("this server answers in text only", ()),
        "web_search_options": ("web search is not supported", ()),
        "reasoning_effort": ("a reasoning model's thinking is switched with chat_template_kwargs", ()),
        "echo": ("a chat answer never repeats the prompt", (False,)),
        "add_generation_prompt": ("the template always adds it", (True,)),
        "continue_final_message": ("not supported", (False,)),
        "chat_template": ("the model's own chat template is always used", ()),
        "documents": ("not supported: put the documents in a message", ([],))}

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:   # 0 asks for nothing, as vLLM takes it
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                              code="invalid_value")
        try:
            tool_calls.check_tools(self.tools, self.tool_choice)
            tool_calls.check_template_kwargs(self.chat_template_kwargs)
        except tool_calls.ToolsError as exc:
            raise OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from None

    @property
    def uses_tools(self) -> bool:
        """Whether the model is shown the tools and its output parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self, native_tools: bool = True) -> list[dict[str, Any]]:
        """Messages as the chat template takes them; `native_tools`: whether the template renders
        tools and tool calls itself (else they are written in the fallback prompt's style)."""
        try:
            messages = tool_calls.template_messages(self.messages, native_tools)
        except tool_calls.ToolsError as exc:
            raise OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from None
        if self.uses_tools and not native_tools:
            messages = tool_calls.with_fallback_prompt(messages, self.tools)
        return messages


class CompletionRequest(_Request):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    echo: bool = False
    logprobs: TopLogprobs | None = None
    suffix: str | None = None
    max_tokens: PositiveInt | None = 16  # OpenAI's default for completions
    best_of: PositiveInt | None = None

    NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = (*_Request.NULL_IS_DEFAULT, "echo", "max_tokens")

    # the chat API's fields, which a completion would otherwise ignore
    REFUSED: ClassVar[dict[str, tuple[str, OffValues]]] = {
        **_Request.REFUSED,
        **{name: ("a chat API field: use /v1/chat/completions", ()) for name in (
            "messages", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
            "top_logprobs", "chat_template", "chat_template_kwargs", "max_completion_tokens")}}

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [*super()._unsupported(), ("echo", self.echo), ("suffix", bool(self.suffix)),
                ("best_of", self.best_of not in (None, self.n))]

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of < self.n:   # wrong, not merely unsupported
            raise OpenAIError(400, f"best_of ({self.best_of}) must be at least n ({self.n})",
                              param="best_of", code="invalid_value")
        super().check_supported()

    def engine_logprobs(self) -> int | None:
        return self.logprobs

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


class GrpcCompletionRequest(CompletionRequest):
    """inference.proto's request on a prompt: the completions API's fields, but with `max_tokens`
    unset it runs to the end of the context, as the proto says (16 is the HTTP API's default,
    OpenAI's)."""
    max_tokens: PositiveInt | None = None

    NULL_IS_DEFAULT: ClassVar[tuple[str, ...]] = tuple(
        f for f in CompletionRequest.NULL_IS_DEFAULT if f != "max_tokens")


def grammar_checks_busy(exc: GrammarChecksBusy) -> OpenAIError:
    return OpenAIError(503, f"{exc}; retry", code="grammar_checks_busy", retry_after_s=1.0)


def too_large(max_bytes: int, size: int | None = None) -> OpenAIError:
    got = f"{size} bytes" if size is not None else "larger than that"
    return OpenAIError(413, f"the request body is {got}; the limit is {max_bytes} bytes",
                       code="request_too_large")


def check_body_headers(content_type: str | None, content_encoding: str | None,
                       content_length: str | None, max_bytes: int) -> None:
    """Refuse a body before reading it: not JSON, compressed, or declared over the size limit."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    # Browsers send text/plain and form bodies cross-origin without a preflight: refusing them keeps
    # a web page from driving a server on localhost. No Content-Type at all is read as JSON (a page
    # that sends such a body is refused by its Origin: browser_origins.py).
    if media and media != "application/json" and not media.endswith("+json"):
        raise OpenAIError(415, f"Content-Type must be application/json, not {media!r} (curl: add "
                          "-H 'Content-Type: application/json')", code="unsupported_media_type")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding != "identity":
        raise OpenAIError(415, f"Content-Encoding {encoding!r} is not supported; send the body "
                          "uncompressed", code="unsupported_media_type")
    if content_length and content_length.strip().isdigit() and int(content_length) > max_bytes:
        raise too_large(max_bytes, int(content_length))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse(model: type[_Request], raw: bytes, max_bytes: int) -> Any:
    """Parse and validate a JSON body into `model`; any problem is an OpenAIError."""
    return validate(model, decode_body(raw, max_bytes))


def decode_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """A request body as a JSON object: UTF-8, within `max_bytes`, no NaN, no unpaired surrogate;
    any problem is an OpenAIError."""
    if len(raw) > max_bytes:
        raise too_large(max_bytes, len(raw))
    try:
        # UTF-8 only, strictly (a BOM allowed, as json.loads allowed it): json.loads would take
        # UTF-16/32 bodies, and surrogates spelled in UTF-8 bytes (which no tokenizer takes)
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OpenAIError(400, f"the body is not valid UTF-8: {exc}") from None
    try:
        # ValueError covers bad JSON, NaN/Infinity and integers of over 4300 digits;
        # RecursionError a body of deeply nested arrays.
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    if "\\u" in text:  # a \ud800 escape decodes to a lone surrogate, which no tokenizer takes
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise OpenAIError(400, "the body holds a string with an unpaired UTF-16 surrogate "
                              "escape (\\ud800-\\udfff)") from None
    return data


def validate(model: type[_Request], data: dict[str, Any]) -> Any:
    """Validate a decoded request (HTTP JSON or a gRPC message as a dict); raises OpenAIError."""
    model.refuse_unimplemented(data)
    try:
        req = model.model_validate(data, strict=True)
    except ValidationError as exc:
        # Of a union's failed alternatives, the one the client meant got deepest into the body
        # ("prompt.1: ... valid integer" for [1, "a"], not "prompt: ... valid string"), or took
        # the value's type and failed a bound (17 stop strings: "at most 16", not "a string").
        errors = exc.errors()
        paths = [_body_path(data, err) for err in errors]
        best = max(range(len(errors)),
                   key=lambda i: (len(paths[i]), not errors[i]["type"].endswith("_type")))
        param = ".".join(str(p) for p in paths[best]) or None
        msg = errors[best]["msg"]
        raise OpenAIError(400, f"{param}: {msg}" if param else msg, param=param,
                          code="invalid_value") from None
    req.check_supported()
    return req


def _body_path(data: Any, err: Any) -> list[str | int]:
    """An error's location as a path into the body, without pydantic's union-member tags."""
    path: list[str | int] = []
    node, loc = data, err["loc"]
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (err["type"] == "missing" and i == len(loc) - 1):
            continue  # a union member's tag ("str", "list[int]"), not a place in the body
        path.append(part)
    return path


# ---------------------------------------------------------------------------- API keys
def parse_api_keys(value: str) -> dict[str, str]:
    """API key -> tenant, from comma-separated `key` or `tenant:key` entries (unnamed keys get
    "key-<position>"); the tenant is what the router's per-key limits are keyed by. Keys may hold
    "=" (base64 padding) but not ":" or ",". An entry with an empty key or tenant (`alpha:`, `:k`)
    or a key listed twice is refused (ValueError): an empty key would admit requests sending none."""
    keys: dict[str, str] = {}
    for i, entry in enumerate(e.strip() for e in value.split(",")):
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        tenant, key = (tenant.strip(), key.strip()) if sep else (f"key-{i}", tenant)
        if not key or not tenant:
            raise ValueError(f"API key entry {i + 1} has an empty {'key' if not key else 'tenant'} "
                             "(entries are `key` or `tenant:key`)")
        if key in keys:
            raise ValueError(f"API key entry {i + 1} repeats an earlier key")
        keys[key] = tenant
    return keys


def tenant_for(authorization: str | list[str] | None, keys: dict[str, str]) -> str | None:
    """The tenant of an `Authorization: Bearer <key>` header (or the list of every Authorization
    header sent); None when no keys are configured.

    The scheme must be exactly "Bearer" (what OpenAI's clients send; other spellings are refused
    rather than guessed), and the key is compared with every configured key in constant time, so
    neither the answer nor its timing says how much of a guess was right. Two Authorization
    headers are refused: which one counts would be a guess too."""
    if not keys:
        return None
    if isinstance(authorization, list):
        if len(authorization) > 1:
            raise OpenAIError(401, "send one Authorization header", code="invalid_api_key")
        authorization = authorization[0] if authorization else None
    scheme, _, presented = (authorization or "").partition(" ")
    candidate = presented.strip().encode()
    tenant = None
    for key, owner in keys.items():
        if hmac.compare_digest(candidate, key.encode()):
            tenant = owner
    if scheme != "Bearer" or tenant is None:
        raise OpenAIError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                          code="invalid_api_key")
    return tenant


# ---------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    use = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        use["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return use


def chat_choice(message: str | dict[str, Any], finish_reason: str | None,
                logprobs: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
    """`message`: the assistant's text, or the whole message (reasoning, tool calls)."""
    if isinstance(message, str):
        message = {"role": "assistant", "content": message}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
                    use: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
               index: int = 0) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
                      index: int = 0) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
               use: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_chunk(request_id: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
                     index: int = 0) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(text, finish_reason, logprobs, index)]}


def token_spelling(data: bytes) -> str:
    """A token's `token` in logprobs: its text, or where its bytes are not whole UTF-8 characters,
    OpenAI's "bytes:\\xf0\\x9f" (so tokens of one emoji stay apart)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str],
                  token_bytes: Callable[[int], bytes] | None = None) -> dict[str, Any]:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None};
    `token_bytes` gives a token's own bytes (default: its text's)."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        data = token_bytes(token_id) if token_bytes else text.encode()
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


class TextOffsets:
    """Completions' text_offset for one choice, token by token: where each token's text starts, in
    characters of the completion, whatever the chunks (a token holding part of a character starts
    where that character does)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0

    def next(self, data: bytes) -> int:
        """The offset of the token with bytes `data`, the one after the tokens seen so far."""
        at = self._chars
        pending = self._utf8.getstate()[0]
        if pending and data and not 0x80 <= data[0] <= 0xBF:
            at += 1   # the earlier token's unfinished character ends here, as one U+FFFD
        self._chars += len(self._utf8.decode(data))
        return at


def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str],
                        offsets: TextOffsets | None = None,
                        token_bytes: Callable[[int], bytes] | None = None) -> dict[str, Any]:
    """Completions' `logprobs`: parallel lists, each top_logprobs with the sampled token too (up to
    logprobs + 1 entries, as OpenAI's legacy API); text_offset from `offsets` (the choice's, carried
    over its chunks; None: these are its first tokens)."""
    offsets = offsets or TextOffsets()
    tokens = [token_text(e.token_id) for e in entries]
    data = [token_bytes(e.token_id) if token_bytes else t.encode() for e, t in zip(entries, tokens)]
    tops = [{token_text(t): lp for t, lp in e.top} for e in entries]
    for top, token, e in zip(tops, tokens, entries):
        if token not in top:
            top[token] = e.logprob
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": [offsets.next(d) for d in data]}


def usage_chunk(request_id: str, model: str, created: int, obj: str,
                use: dict[str, Any]) -> dict[str, Any]:
    """The final chunk of a stream with stream_options.include_usage: no choices, just usage."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


def model_entry(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "pdcluster"}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(model, created)]}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
