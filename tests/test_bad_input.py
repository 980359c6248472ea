"""Bad input against one live cluster: every row of CASES (malformed or non-JSON bodies, wrong types,
out-of-range values, unknown model, wrong methods, oversized bodies) gets its status with an OpenAI
error body, then the cluster answers as before and holds nothing. Then fuzzing: the HTTP API from
its own /openapi.json (schemathesis) and gRPC Generate with garbage bytes and random fields.

README.md's "Bad input" table is rendered from CASES: `python tests/test_bad_input.py` rewrites it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cluster_harness as h

README = Path(__file__).resolve().parents[1] / "README.md"
KEYS_ENV, KEY = "PDCLUSTER_BAD_INPUT_KEYS", "sk-bad-input-test"
LIMITED_KEY = "sk-limited-tenant"  # tenant "limited", allowed one request at a time
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, CMPL, RESP = "/v1/chat/completions", "/v1/completions", "/v1/responses"
MAX_BODY = 4 << 20  # serve.max_body_bytes' default, which the cluster below keeps
CONTEXT = 192  # tokens
MSGS = [{"role": "user", "content": "Say hi."}]
OK_CHAT = {"model": h.MODEL, "messages": MSGS, "max_tokens": 2, "temperature": 0}
OK_CMPL = {"model": h.MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
ANY = object()  # an expectation that any value meets


@dataclass(frozen=True)
class Case:
    """One bad request and what it must get: `status`, and for 4xx an OpenAI error body whose
    message contains `says` (case-insensitive) and whose param/code are as given (ANY: unchecked)."""
    name: str
    status: int
    body: bytes | dict | None = None
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    says: str = ""
    param: Any = ANY
    code: Any = ANY
    chunked: bool = False  # send the body with chunked transfer encoding (no Content-Length)
    auth: bool = True

    @property
    def request(self) -> str:
        return f"{self.method} {self.path}"


def chat(**fields: Any) -> dict:
    return {k: v for k, v in {**OK_CHAT, **fields}.items() if v is not ...}


def cmpl(**fields: Any) -> dict:
    return {k: v for k, v in {**OK_CMPL, **fields}.items() if v is not ...}


BIG = b'{"prompt": "' + b"x" * MAX_BODY + b'"}'


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


CASES = [
    # -- transport: method, route, auth, headers, size
    Case("GET on a POST route", 405, None, CHAT, "GET", says="method not allowed"),
    Case("PUT on a POST route", 405, cmpl(), CMPL, "PUT", says="method not allowed"),
    Case("POST to /v1/models", 405, {}, "/v1/models", says="method not allowed"),
    Case("unknown route", 404, None, "/v1/engines", "GET", says="not found"),
    Case("a model this server does not serve", 404, None, "/v1/models/gpt-4o", "GET", says="does not exist",
         param="model", code="model_not_found"),
    Case("no API key", 401, chat(), auth=False, says="api key", code="invalid_api_key"),
    Case("wrong API key", 401, chat(), headers={"Authorization": "Bearer sk-wrong"},
         says="api key", code="invalid_api_key"),
    Case("lowercase bearer scheme", 401, chat(), headers={"Authorization": f"bearer {KEY}"},
         says="api key", code="invalid_api_key"),
    Case("key without a scheme", 401, chat(), headers={"Authorization": KEY}, says="api key",
         code="invalid_api_key"),
    Case("Content-Type text/plain", 415, chat(), headers={"Content-Type": "text/plain"},
         says="application/json", code="unsupported_media_type"),
    Case("Content-Type form-urlencoded", 415, b"prompt=hi", CMPL,
         headers={"Content-Type": "application/x-www-form-urlencoded"}, says="application/json"),
    Case("Content-Encoding gzip", 415, chat(), headers={"Content-Encoding": "gzip"}, says="gzip"),
    Case("no Content-Type (read as JSON)", 200, json.dumps(chat()).encode(),
         headers={"Content-Type": ""}),
    Case("body over the 4 MiB limit", 413, BIG, CMPL, says="limit", code="request_too_large"),
    Case("chunked body over the limit", 413, BIG, CMPL, chunked=True, says="limit",
         code="request_too_large"),
    # -- not JSON, or not a JSON object
    Case("empty body", 400, b"", says="not valid JSON"),
    Case("malformed JSON", 400, b'{"messages": [', says="not valid JSON"),
    Case("trailing garbage", 400, json.dumps(cmpl()).encode() + b" x", CMPL, says="not valid JSON"),
    Case("JSON array body", 400, b"[1, 2]", says="JSON object"),
    Case("JSON null body", 400, b"null", CMPL, says="JSON object"),
    Case("invalid UTF-8", 400, b'{"prompt": "\xff\xfe\xfd"}', CMPL, says="not valid UTF-8"),
    Case("a surrogate in UTF-8 bytes", 400,
         b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}', says="not valid UTF-8"),
    Case("JSON in UTF-16", 400, json.dumps(cmpl()).encode("utf-16"), CMPL, says="not valid UTF-8"),
    Case("lone UTF-16 surrogate escape", 400, b'{"prompt": "a\\ud800b"}', CMPL, says="surrogate"),
    Case("NaN literal", 400, b'{"messages": [], "temperature": NaN}', says="NaN"),
    Case("Infinity literal", 400, b'{"prompt": "x", "top_p": -Infinity}', CMPL, says="Infinity"),
    Case("arrays nested 100000 deep", 400, b'{"prompt": ' + b"[" * 100_000, CMPL,
         says="not valid JSON"),
    Case("5000-digit integer", 400, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", CMPL,
         says="not valid JSON"),
    # -- model and messages
    Case("unknown model", 404, chat(model="gpt-4"), says="does not exist", param="model",
         code="model_not_found"),
    Case("unknown model, streaming", 404, cmpl(model="gpt-4", stream=True), CMPL,
         code="model_not_found"),
    Case("model is a number", 400, chat(model=7), says="valid string", param="model"),
    Case("messages missing", 400, chat(messages=...), says="required", param="messages"),
    Case("messages empty", 400, chat(messages=[]), says="at least 1", param="messages"),
    Case("messages is a string", 400, chat(messages="hi"), says="valid list", param="messages"),
    Case("unknown role", 400, chat(messages=[{"role": "robot", "content": "x"}]),
         param="messages.0.role"),
    Case("user message without content", 400, chat(messages=[{"role": "user"}]), says="needs content",
         param="messages.0"),
    Case("image content part", 400, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), param="messages.0.content.0.type"),
    Case("chat over the context", 400, chat(messages=[{"role": "user", "content": "hi " * CONTEXT}]),
         says="context", param="messages", code="context_length_exceeded"),
    # -- prompt (completions)
    Case("prompt text no context could hold", 400, cmpl(prompt="x" * (CONTEXT * 1000)), CMPL,
         says="bytes", param="prompt", code="context_length_exceeded"),
    Case("chat text no context could hold", 400, chat(messages=[{"role": "user",
         "content": "x" * (CONTEXT * 1000)}]), says="bytes", param="messages",
         code="context_length_exceeded"),
    Case("empty messages no context could hold", 400, chat(messages=[{"role": "user", "content": ""}]
         * (CONTEXT * 20)), says="renders", param="messages", code="context_length_exceeded"),
    Case("prompt missing", 400, cmpl(prompt=...), CMPL, says="required", param="prompt"),
    Case("prompt empty string", 400, cmpl(prompt=""), CMPL, says="empty", param="prompt"),
    Case("prompt empty list", 400, cmpl(prompt=[]), CMPL, says="empty", param="prompt"),
    Case("prompt is a number", 400, cmpl(prompt=5), CMPL, param="prompt"),
    Case("prompt mixes ints and strings", 400, cmpl(prompt=[1, "a"]), CMPL, says="valid integer",
         param="prompt.1"),
    Case("prompt token ids (valid)", 200, cmpl(prompt=[1, 2, 3]), CMPL),
    Case("prompt token id >= vocab", 400, cmpl(prompt=[1, 10**6]), CMPL, says="token ids",
         param="prompt"),
    Case("prompt token id negative", 400, cmpl(prompt=[-1, 2]), CMPL, says="token ids",
         param="prompt"),
    Case("prompt token id 2**70", 400, cmpl(prompt=[2**70]), CMPL, says="token ids", param="prompt"),
    Case("two prompts in a batch", 400, cmpl(prompt=["a", "b"]), CMPL, says="one prompt",
         param="prompt", code="unsupported_parameter"),
    Case("prompt fills the whole context", 400, cmpl(prompt=[42] * CONTEXT), CMPL, says="context",
         param="prompt", code="context_length_exceeded"),
    # -- max_tokens
    Case("max_tokens 0", 400, chat(max_tokens=0), says="greater than or equal to 1",
         param="max_tokens"),
    Case("max_tokens -1", 400, cmpl(max_tokens=-1), CMPL, param="max_tokens"),
    Case("max_tokens huge", 400, cmpl(max_tokens=10**9), CMPL, says="context", param="max_tokens",
         code="context_length_exceeded"),
    Case("max_tokens 1.5", 400, chat(max_tokens=1.5), says="valid integer", param="max_tokens"),
    Case('max_tokens "5"', 400, chat(max_tokens="5"), says="valid integer", param="max_tokens"),
    Case("max_tokens true", 400, cmpl(max_tokens=True), CMPL, param="max_tokens"),
    Case("max_completion_tokens 0", 400, chat(max_completion_tokens=0),
         param="max_completion_tokens"),
    # -- sampling values
    Case("temperature -1", 400, chat(temperature=-1), param="temperature"),
    Case("temperature 1e9", 400, chat(temperature=1e9), param="temperature"),
    Case('temperature "0.5"', 400, cmpl(temperature="0.5"), CMPL, says="valid number",
         param="temperature"),
    Case("temperature 1e-45 (greedy)", 200, cmpl(temperature=1e-45), CMPL),
    Case("temperature -1, streaming", 400, chat(temperature=-1, stream=True), param="temperature"),
    Case("top_p 0", 400, chat(top_p=0), param="top_p"),
    Case("top_p 2", 400, cmpl(top_p=2), CMPL, param="top_p"),
    Case("top_p 1e-300 (top token only)", 200, cmpl(temperature=1, top_p=1e-300), CMPL),
    Case("top_k -2", 400, cmpl(top_k=-2), CMPL, param="top_k"),
    Case("top_k 2**40", 400, cmpl(top_k=2**40, top_p=0.5), CMPL, param="top_k"),
    Case("min_p 2", 400, cmpl(min_p=2), CMPL, param="min_p"),
    Case("seed 2**64", 400, cmpl(seed=2**64, temperature=1), CMPL, param="seed"),
    Case("n beyond the admission limit", 400, chat(n=10_000), says="at once", param="n"),
    Case("n 0", 400, cmpl(n=0), CMPL, param="n"),
    Case("top_logprobs without logprobs", 400, chat(top_logprobs=3), says="requires logprobs",
         param="top_logprobs"),
    Case("top_logprobs 21", 400, chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    Case("logprobs -1", 400, cmpl(logprobs=-1), CMPL, param="logprobs"),
    Case("logprobs 21 (completions)", 400, cmpl(logprobs=21), CMPL, param="logprobs"),
    Case("presence_penalty 2.5", 400, chat(presence_penalty=2.5), param="presence_penalty"),
    Case("frequency_penalty -3", 400, cmpl(frequency_penalty=-3), CMPL, param="frequency_penalty"),
    Case("repetition_penalty 0", 400, chat(repetition_penalty=0), param="repetition_penalty"),
    Case("logit_bias 101", 400, chat(logit_bias={"5": 101}), param="logit_bias.5"),
    Case("logit_bias key not a token id", 400, chat(logit_bias={"a": 1}), says="token ids",
         param="logit_bias"),
    Case("logit_bias key outside the vocabulary", 400, cmpl(logit_bias={"1000000": 1}), CMPL,
         says="token ids", param="logit_bias"),
    Case("min_tokens over max_tokens", 400, chat(min_tokens=9, max_tokens=2), param="min_tokens"),
    Case("response_format xml", 400, chat(response_format={"type": "xml"}), param="response_format.type"),
    Case("json_schema the grammar library refuses", 400, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}),
         says="invalid json_schema", param="response_format.json_schema.schema"),
    Case("strict json_schema with a keyword the grammar cannot enforce", 400, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}),
         says="uniqueItems", param="response_format.json_schema.schema"),
    Case("strict forced tool call whose parameters the grammar cannot enforce", 400, chat(
        tools=[{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}}}],
        tool_choice="required"), says="multipleOf", param="tools.0.function.parameters"),
    Case("legacy functions", 400, chat(functions=[{"name": "f", "parameters": {"type": "object"}}]),
         says="use tools", param="functions", code="unsupported_parameter"),
    Case("audio output", 400, chat(modalities=["text", "audio"]), param="modalities",
         code="unsupported_parameter"),
    Case("best_of 3", 400, cmpl(best_of=3), CMPL, param="best_of", code="unsupported_parameter"),
    Case("CORS preflight, no origin allowed (the default)", 405, None, method="OPTIONS",
         headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}),
    Case("POST from a web page, no origin allowed (a body with no Content-Type needs no preflight)",
         403, chat(), headers={"Origin": "https://evil.example", "Content-Type": ""},
         code="origin_not_allowed"),
    Case("best_of below n", 400, cmpl(n=2, best_of=1), CMPL, says="at least n", param="best_of"),
    Case("message content an empty list of parts", 400,
         chat(messages=[{"role": "user", "content": []}]), param="messages.0.content"),
    Case("stream_options without stream", 400, cmpl(stream_options={"include_usage": True}), CMPL,
         says="only allowed when stream is true", param="stream_options"),
    Case("json_schema without its object", 400, chat(response_format={"type": "json_schema"}),
         param="response_format.json_schema"),
    Case("tool parameters not a JSON Schema", 400,
         chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
         says="not a valid JSON Schema", param="tools.0.function.parameters"),
    Case("tool_choice names an absent function", 400,
         chat(tools=[{"type": "function", "function": {"name": "f"}}],
              tool_choice={"type": "function", "function": {"name": "g"}}), param="tool_choice"),
    Case("tool_choice required without tools", 400, chat(tool_choice="required"), param="tool_choice"),
    Case("tool_choice auto without tools", 400, chat(tool_choice="auto"), param="tool_choice"),
    Case("tool parameters nested 150 deep", 400, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": _nested(150)}}]), says="nests", param="tools.0.function.parameters"),
    Case("tool message answering no call", 400,
         chat(messages=[*MSGS, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]),
         param="messages.1.tool_call_id"),
    Case("tool call arguments not a JSON object", 400, chat(messages=[*MSGS, {
        "role": "assistant", "tool_calls": [{"id": "call_x", "type": "function",
                                             "function": {"name": "f", "arguments": "{x"}}]}]),
         param="messages.1.tool_calls.0.function.arguments"),
    Case("chat_template_kwargs sets tokenize", 400, chat(chat_template_kwargs={"tokenize": False}),
         param="chat_template_kwargs"),
    Case("tools and tool messages, valid", 200, chat(
        tools=[{"type": "function", "function": {"name": "f"}}], messages=[*MSGS, {
            "role": "assistant", "tool_calls": [{"id": "call_x", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_x", "content": "done"}])),
    Case("echo true", 400, cmpl(echo=True), CMPL, param="echo", code="unsupported_parameter"),
    Case("empty tools list (no tools, as in vLLM)", 200, chat(tools=[])),
    Case("a chat template in the request (vLLM)", 400, chat(chat_template="{{ messages }}"),
         says="own chat template", param="chat_template", code="unsupported_parameter"),
    Case("logprob tokens as token ids (vLLM)", 400, chat(logprobs=True, return_tokens_as_token_ids=True),
         param="return_tokens_as_token_ids", code="unsupported_parameter"),
    Case("messages sent to completions", 400, cmpl(messages=MSGS), CMPL, says="chat API field",
         param="messages", code="unsupported_parameter"),
    Case("tools sent to completions", 400, cmpl(tools=[{"type": "function", "function": {"name": "f"}}]),
         CMPL, param="tools", code="unsupported_parameter"),
    Case("17 stop strings", 400, chat(stop=[f"s{i}" for i in range(17)]), says="at most 16",
         param="stop"),
    Case("empty stop string", 400, cmpl(stop=[""]), CMPL, param="stop.0"),
    Case("stop is a number", 400, chat(stop=5), param="stop"),
    Case('stream "yes"', 400, chat(stream="yes"), says="valid boolean", param="stream"),
    Case("stream_options not an object", 400, cmpl(stream=True, stream_options=1), CMPL,
         param="stream_options"),
    Case("streaming, valid", 200, chat(stream=True)),
]


def table() -> str:
    """CASES as the README's markdown table."""
    rows = [f"| {c.name.replace('|', '/')} | `{c.request}` | {c.status} |" for c in CASES]
    return "\n".join(["| case | request | status |", "| --- | --- | --- |", *rows])


_README_TABLE = re.compile(r"(<!-- bad-input table[^\n]*-->\n)(.*?)\n?(<!-- end bad-input table -->)",
                           re.S)


def test_readme_table_is_the_cases():
    found = _README_TABLE.search(README.read_text())
    assert found, "README.md lacks the bad-input table markers"
    assert found.group(2) == table(), "README's bad-input table is stale: python tests/test_bad_input.py"


# ------------------------------------------------------------------------------ the live cluster
@pytest.fixture(scope="module")
def cluster():
    import ray

    # the Serve replica inherits it through ray.init
    os.environ[KEYS_ENV] = f"tester:{KEY},limited:{LIMITED_KEY}"
    # A short context bounds what any accepted request can generate (the fuzzer's included).
    spec = h.small_spec(serve={"api_keys_env": KEYS_ENV}, model={"max_model_len": CONTEXT},
                        router={"per_key_limits": {"limited": 1}})
    # "local": a Ray of our own even while another run's `ray start` cluster is up on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             resources={"pd_prefill": 1, "pd_decode": 1})
    try:
        yield spec, h.serve_cluster(spec)
    finally:
        h.stop_cluster()
        os.environ.pop(KEYS_ENV, None)


@pytest.fixture(scope="module")
def http(cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster[1], timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def before(http) -> dict[str, Any]:
    """A greedy answer and the error count, taken before any bad input reaches the cluster."""
    answer = http.post(CHAT, json=chat(max_tokens=12), headers=AUTH)
    assert answer.status_code == 200, answer.text
    return {"answer": answer.json()["choices"][0]["message"]["content"], "errors": _errors(http)}


def _errors(http: httpx.Client) -> float:
    metrics = h.metric_values(http.get("/metrics").text)
    return metrics.get(("pdcluster_requests_total", (("status", "error"),)), 0.0)


def _responses(http: httpx.Client, status: int) -> float:
    """HTTP responses with this status code so far, over every route but /metrics."""
    metrics = h.metric_values(http.get("/metrics").text)
    return sum(v for (name, labels), v in metrics.items()
               if name == "pdcluster_http_responses_total" and ("code", str(status)) in labels
               and ("route", "/metrics") not in labels)


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = {**(AUTH if case.auth else {}), **case.headers}
    body = case.body
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if headers.get("Content-Type") == "":
        del headers["Content-Type"]
    if case.chunked:
        data = body or b""
        content: Any = (data[i:i + 65536] for i in range(0, len(data), 65536))
    else:
        content = body
    return http.request(case.method, case.path, content=content, headers=headers)


def _is_openai_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"].strip(), body
    assert isinstance(err["type"], str) and err["type"], body
    return err


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c.name} -> {c.status}" for c in CASES])
def test_bad_input(http, before, case: Case):
    counted = _responses(http, case.status)
    response = _send(http, case)
    assert response.status_code == case.status, (response.status_code, response.text[:500])
    assert _responses(http, case.status) == counted + 1  # /metrics counts refusals too
    if case.status == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.json()["usage"]["completion_tokens"] >= 1
        return
    err = _is_openai_error(response)
    assert case.says.lower() in err["message"].lower(), err
    assert case.param is ANY or err["param"] == case.param, err
    assert case.code is ANY or err["code"] == case.code, err
    if case.status == 405:
        assert response.headers["allow"]
    assert "access-control-allow-origin" not in response.headers   # no origin is allowed here


@pytest.mark.integration
@pytest.mark.slow
def test_cluster_is_unharmed_after_bad_input(http, before):
    h.wait_idle()
    snap = h.snapshot()
    assert all(w.healthy for w in snap.workers), h.describe(snap)
    assert _errors(http) == before["errors"]  # nothing failed inside the cluster
    again = http.post(CHAT, json=chat(max_tokens=12), headers=AUTH)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == before["answer"]


@pytest.mark.integration
@pytest.mark.slow
def test_per_key_limit_over_http(http, before):
    """A tenant allowed one request at a time sends four at once: one runs, the others get 429
    tenant_limit with Retry-After; another tenant's request meanwhile is served."""
    from concurrent.futures import ThreadPoolExecutor

    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body = cmpl(max_tokens=CONTEXT - 16, ignore_eos=True)
    with ThreadPoolExecutor(5) as pool:
        burst = [pool.submit(http.post, CMPL, json=body, headers=limited) for _ in range(4)]
        other = pool.submit(http.post, CMPL, json=body, headers=AUTH)
        answers = [f.result() for f in burst]
    assert other.result().status_code == 200
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}, statuses
    refused = [a for a in answers if a.status_code == 429]
    for a in refused:
        assert a.json()["error"]["code"] == "tenant_limit" and int(a.headers["Retry-After"]) >= 1
    h.wait_for(lambda: h.snapshot().in_flight == 0)
    assert http.post(CMPL, json=cmpl(), headers=limited).status_code == 200  # its slot came back


# ------------------------------------------------------------------------------ HTTP fuzzing
FUZZ_EXAMPLES = 40  # per operation and generation mode
FUZZ_MAX_TOKENS = 3


def _positive_schema(served: dict[str, Any]) -> dict[str, Any]:
    """The served document with max_tokens required and tiny, so generated valid requests finish in
    a moment on CPU (the served schema allows anything up to the context). Invalid requests are
    generated from the served document itself: a tighter schema would make the fuzzer call valid
    values invalid."""
    document = copy.deepcopy(served)
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key] = {"type": "integer", "minimum": 1, "maximum": FUZZ_MAX_TOKENS}
        schemas[name]["required"] = sorted({*schemas[name].get("required", []), "max_tokens"})
    return document


def _openai_error_body(ctx, response, case) -> None:
    """Every 4xx carries the OpenAI error body with a message."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body


@pytest.mark.integration
@pytest.mark.slow
def test_http_api_fuzzed_from_its_openapi_document(http, cluster, before):
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    served = http.get("/openapi.json")
    assert served.status_code == 200
    modes = schemathesis.GenerationMode
    # The API key is ours to send (the table covers missing and wrong keys): left in the
    # document, most invalid requests generated would differ only in the key.
    document = {k: v for k, v in served.json().items() if k != "security"}
    schemas = {modes.POSITIVE: schemathesis.openapi.from_dict(_positive_schema(document)),
               modes.NEGATIVE: schemathesis.openapi.from_dict(document)}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection, _openai_error_body]
    for path, body in ((CHAT, chat(stream=True)), (CMPL, cmpl(stream=True))):
        # a stream, every run: its events are checked against the document's event schema
        schemas[modes.NEGATIVE][path]["POST"].Case(body=body).call_and_validate(
            base_url=cluster[1], headers=AUTH, checks=checks, timeout=60)
    statuses: dict[tuple[str, str], set[int]] = {}
    refusals: dict[str, list[str]] = {CHAT: [], CMPL: []}   # why valid requests were refused
    for path in (CHAT, CMPL):
        for mode in (modes.POSITIVE, modes.NEGATIVE):
            operation = schemas[mode][path]["POST"]
            seen = statuses.setdefault((path, mode.value), set())

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call(base_url=cluster[1], headers=AUTH, timeout=60)
                seen.add(response.status_code)
                if mode == modes.POSITIVE and response.status_code != 200:
                    refusals[path].append(f"{response.status_code} {response.text[:200]}")
                case.validate_response(response, checks=checks, headers=AUTH)

            fuzz()
    # the Responses API: invalid requests only (a valid one's function_call_output must answer an
    # earlier call, its tool_choice name a given tool: more than its schema can say); a stream's
    # typed events against the document
    responses = schemas[modes.NEGATIVE][RESP]["POST"]
    for body in ({"input": "Say hi.", "max_output_tokens": 3, "stream": True},
                 {"instructions": "Be brief.", "input": [{"role": "user", "content": "Say hi."}],
                  "max_output_tokens": 3, "include": ["message.output_text.logprobs"], "top_logprobs": 1}):
        responses.Case(body=body).call_and_validate(base_url=cluster[1], headers=AUTH, checks=checks,
                                                    timeout=60)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=responses.as_strategy(generation_mode=modes.NEGATIVE))
    def fuzz_responses(case):
        response = case.call(base_url=cluster[1], headers=AUTH, timeout=60)
        statuses.setdefault((RESP, "negative"), set()).add(response.status_code)
        case.validate_response(response, checks=checks, headers=AUTH)

    fuzz_responses()
    for path in (CHAT, CMPL):  # valid requests were served, invalid ones refused
        assert 200 in statuses[path, "positive"], (statuses, refusals[path][:10])
    for path in (CHAT, CMPL, RESP):
        assert statuses[path, "negative"] and all(400 <= c < 500 for c in statuses[path, "negative"])
    h.wait_idle()
    assert _errors(http) == before["errors"]


# ------------------------------------------------------------------------------ gRPC fuzzing
GRPC_EXAMPLES = 30
GENERATE = "/pdcluster.inference.v1.Inference/Generate"
# The codes that mean "your request is wrong" (or a legitimate refusal), never "the server broke".
GRPC_REJECTIONS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.RESOURCE_EXHAUSTED}


def _generate(channel: grpc.Channel, payload: bytes) -> grpc.StatusCode:
    """Send raw request bytes to Generate; the stream's final status."""
    from pdcluster.proto import inference_pb2 as pb

    call = channel.unary_stream(GENERATE, request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    try:
        for message in call(payload, timeout=60, metadata=[("authorization", f"Bearer {KEY}")]):
            assert message.request_id
    except grpc.RpcError as err:
        assert err.code() in GRPC_REJECTIONS, (err.code(), err.details())
        assert err.details(), err.code()
        return err.code()
    return grpc.StatusCode.OK


def _small(pb) -> bytes:
    # Appended to any payload: the last value of a scalar field wins, so whatever the garbage
    # decodes to, generation stops after two tokens.
    return pb.GenerateRequest(max_tokens=2).SerializeToString()


def _requests(pb) -> st.SearchStrategy:
    texts = st.text(max_size=40)
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(
        ["user", "system", "assistant", "developer", "tool", ""]) | texts, content=texts), max_size=3)
    return st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["", h.MODEL]) | texts,
        "prompt": texts,
        "messages": messages,
        "prompt_token_ids": st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(0, 50_000),
                                     max_size=8),
        # never unset: that generates until the context is full
        "max_tokens": st.integers(0, 3) | st.integers(10**6, 2**32 - 1),
        "temperature": floats, "top_p": floats, "min_p": floats,
        "top_k": st.integers(-2**31, 2**31 - 1),
        "seed": st.integers(-2**63, 2**63 - 1),
        "stop": st.lists(texts, max_size=20),
        "ignore_eos": st.booleans(),
    }).map(lambda fields: pb.GenerateRequest(**{"max_tokens": 2, **fields}))


@pytest.mark.integration
@pytest.mark.slow
def test_grpc_generate_fuzzed_with_garbage_and_random_fields(cluster, http, before):
    from pdcluster.proto import inference_pb2 as pb

    seen: dict[str, set[grpc.StatusCode]] = {"bytes": set(), "fields": set()}
    with grpc.insecure_channel(f"127.0.0.1:{cluster[0].serve.grpc_port}") as channel:
        common = settings(max_examples=GRPC_EXAMPLES, deadline=None, database=None,
                          derandomize=True, suppress_health_check=list(HealthCheck))

        @common
        @given(payload=st.binary(max_size=200))
        def garbage(payload: bytes):
            seen["bytes"].add(_generate(channel, payload + _small(pb)))

        @common
        @given(request=_requests(pb))
        @example(request=pb.GenerateRequest(prompt="Hi", max_tokens=2))  # a valid one, always tried
        def fields(request):
            seen["fields"].add(_generate(channel, request.SerializeToString()))

        garbage()
        fields()
        # undecodable bytes: invalid UTF-8 in a string field, a truncated varint
        seen["bytes"].add(_generate(channel, b"\x12\x02\xff\xfe" + _small(pb)))
        seen["bytes"].add(_generate(channel, _small(pb) + b"\x28\xff"))
        # and the server still serves
        ok = pb.GenerateRequest(prompt="Hello", max_tokens=2, temperature=0).SerializeToString()
        assert _generate(channel, ok) == grpc.StatusCode.OK
    assert seen["bytes"] == {grpc.StatusCode.INVALID_ARGUMENT}, seen
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen["fields"], seen
    h.wait_idle()
    assert _errors(http) == before["errors"]


if __name__ == "__main__":  # rewrite README.md's table from CASES
    text = README.read_text()
    if not _README_TABLE.search(text):
        sys.exit("README.md lacks the bad-input table markers")
    README.write_text(_README_TABLE.sub(lambda m: m.group(1) + table() + "\n" + m.group(3), text))
