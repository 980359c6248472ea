"""The OpenAPI 3.1 document of the public HTTP API, built from the request models of openai_protocol
so that it cannot drift from what the server validates; the ingress serves it at /openapi.json."""
from __future__ import annotations

from typing import Any

from . import openai_protocol as oai
from .responses_api import CHAT_FIELDS

_REF = "#/components/schemas/{model}"
_FINISH = {"enum": ["stop", "length", "tool_calls", None]}
_ID = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}

_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": _ID, "type": {"const": "function"}, "function": {
        "type": "object", "required": ["name", "arguments"],
        "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
# A stream's tool-call delta: index, then id, type and name once, then argument fragments.
_TOOL_CALL_DELTA = {"type": "object", "required": ["index", "function"], "properties": {
    "index": _INT, "id": _ID, "type": {"const": "function"}, "function": {
        "type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
_NULLABLE_TEXT = {"type": ["string", "null"]}
_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"],
          "properties": {"id": _ID, "object": {"const": "model"}, "created": _INT,
                         "owned_by": {"type": "string"}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                         "prompt_tokens_details": {"type": "object",
                                                   "properties": {"cached_tokens": _INT}},
                         "completion_tokens_details": {"type": "object",
                                                       "properties": {"reasoning_tokens": _INT}}}}


_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"],
            "properties": {"token": {"type": "string"}, "logprob": {"type": "number"},
                           "bytes": {"type": "array", "items": {"type": "integer"}}}}
_CHAT_LOGPROBS = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["content"], "properties": {
    "content": {"type": "array", "items": {**_LOGPROB, "required": [*_LOGPROB["required"], "top_logprobs"],
                                           "properties": {**_LOGPROB["properties"], "top_logprobs": {
                                               "type": "array", "items": _LOGPROB}}}},
    "refusal": {"type": "null"}}}]}
_COMPLETION_LOGPROBS = {"anyOf": [{"type": "null"}, {
    "type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                   "token_logprobs": {"type": "array", "items": {"type": "number"}},
                   "top_logprobs": {"type": "array", "items": {
                       "type": "object", "additionalProperties": {"type": "number"}}},
                   "text_offset": {"type": "array", "items": _INT}}}]}
_LOGPROBS = {"chat.completion": _CHAT_LOGPROBS, "chat.completion.chunk": _CHAT_LOGPROBS,
             "text_completion": _COMPLETION_LOGPROBS}


def _completion(obj: str, choice: dict[str, Any], chunk: bool = False) -> dict[str, Any]:
    """A completion, or one chunk of a stream (no usage but on the last, which has no choices)."""
    return {"type": "object",
            "required": ["id", "object", "created", "model", "choices", *([] if chunk else ["usage"])],
            "properties": {"id": _ID, "object": {"const": obj}, "created": _INT,
                           "model": {"type": "string"},
                           # a stream's chunks before the usage chunk say null (include_usage)
                           "usage": ({"anyOf": [{"type": "null"}, {"$ref": _REF.format(model="Usage")}]}
                                     if chunk else {"$ref": _REF.format(model="Usage")}),
                           "choices": {"type": "array", "minItems": 0 if chunk else 1, "items": {
                               "type": "object", "required": ["index", "finish_reason", *choice],
                               "properties": {"index": _INT, "logprobs": _LOGPROBS[obj],
                                              "finish_reason": _FINISH, **choice}}}}}


def _event_stream(chunk: str) -> dict[str, Any]:
    """One server-sent event: a JSON chunk, an error after the stream began, or the final [DONE]."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": _REF.format(model=chunk)}, {"$ref": _REF.format(model="Error")}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


# OpenAI's Responses API (responses_api.py): the request's shape (what else the server checks, the
# chat path checks, as for chat completions), the response object and its stream's typed events.
_TEXT_PART = {"anyOf": [
    {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "refusal"], "properties": {
        "type": {"const": "refusal"}, "refusal": {"type": "string"}}}]}
_INPUT_ITEM = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"anyOf": [{"type": "string"},
                              {"type": "array", "minItems": 1, "items": _TEXT_PART}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "a JSON object, as text"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"},
        "call_id": {"type": "string", "description": "an earlier function_call item's"},
        "output": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _TEXT_PART}]}}},
    {"type": "object", "required": ["type"], "properties": {
        "type": {"const": "reasoning"}, "encrypted_content": {"type": "null"},
        **{key: {"type": "array", "items": {"type": "object", "required": ["text"],
                                            "properties": {"text": {"type": "string"}}}}
           for key in ("content", "summary")}}}]}
_NULL = {"type": "null"}
_RESPONSE_REQUEST = {"type": "object", "required": ["input"], "properties": {
    "model": {"type": ["string", "null"]},
    "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _INPUT_ITEM}]},
    "instructions": {"type": ["string", "null"]},
    "max_output_tokens": {"anyOf": [{"type": "integer", "minimum": 1}, _NULL]},
    "temperature": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 2}, _NULL]},
    "top_p": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, _NULL]},
    "stream": {"type": ["boolean", "null"]},
    "tools": {"anyOf": [{"type": "array", "items": {
        "type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.\-]{1,64}$"},
            "description": {"type": ["string", "null"]}, "parameters": {"type": ["object", "null"]},
            "strict": {"type": ["boolean", "null"]}}}}, _NULL]},
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, _NULL, {
        "type": "object", "required": ["type", "name"],
        "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "text": {"anyOf": [_NULL, {"type": "object", "properties": {
        "verbosity": {"anyOf": [{"const": "medium"}, _NULL]},
        "format": {"anyOf": [
            _NULL, {"type": "object", "required": ["type"], "properties": {
                "type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "name", "schema"], "properties": {
                "type": {"const": "json_schema"},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": ["string", "null"]},
                "schema": {"type": "object", "description": "a JSON Schema the grammar library takes"},
                "strict": {"type": ["boolean", "null"]}}}]}}}]},
    "reasoning": {"anyOf": [_NULL, {"type": "object", "properties": {
        "effort": _NULL, "summary": {"anyOf": [{"const": "auto"}, _NULL]},
        "generate_summary": {"anyOf": [{"const": "auto"}, _NULL]}}}]},
    "include": {"anyOf": [_NULL, {"type": "array", "items": {
        "enum": ["message.output_text.logprobs", "reasoning.encrypted_content"]}}]},
    "top_logprobs": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 20}, _NULL],
                     "description": "above 0 only with include message.output_text.logprobs"},
    "metadata": {"anyOf": [_NULL, {"type": "object", "maxProperties": 16,
                                   "propertyNames": {"maxLength": 64},
                                   "additionalProperties": {"type": "string", "maxLength": 512}}]},
    "store": {"anyOf": [{"const": False}, _NULL], "description": "nothing is stored"},
    "truncation": {"anyOf": [{"const": "disabled"}, _NULL]},
    "service_tier": {"anyOf": [{"enum": ["auto", "default"]}, _NULL]},
    "background": {"anyOf": [{"const": False}, _NULL]},
    "user": {"type": ["string", "null"]},
    # chat's fields are refused, not dropped
    **{name: {"type": "null", "description": f"not a Responses API field{': ' + why if why else ''}"}
       for name, why in CHAT_FIELDS.items()}}}
_OUTPUT_ITEM = {"type": "object", "required": ["id", "type", "status"], "properties": {
    "id": _ID, "type": {"enum": ["message", "reasoning", "function_call"]},
    "status": {"enum": ["in_progress", "completed", "incomplete"]}, "role": {"const": "assistant"},
    "content": {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"enum": ["output_text", "reasoning_text"]}, "text": {"type": "string"},
        "logprobs": {"type": "array", "items": _LOGPROB}}}},
    "call_id": {"type": "string"}, "name": {"type": "string"}, "arguments": {"type": "string"}}}
_RESPONSE = {"type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
             "properties": {
                 "id": _ID, "object": {"const": "response"}, "created_at": _INT,
                 "status": {"enum": ["in_progress", "completed", "incomplete", "failed"]},
                 "model": {"type": "string"}, "output": {"type": "array", "items": _OUTPUT_ITEM},
                 "store": {"const": False},
                 "usage": {"anyOf": [_NULL, {"type": "object", "required": [
                     "input_tokens", "output_tokens", "total_tokens"], "properties": {
                     "input_tokens": _INT, "output_tokens": _INT, "total_tokens": _INT}}]}}}
_RESPONSE_EVENT = {"type": "object", "required": ["type", "sequence_number"], "properties": {
    "type": {"type": "string", "pattern": "^response\\."}, "sequence_number": _INT,
    "response": {"$ref": _REF.format(model="Response")}, "item": _OUTPUT_ITEM,
    "output_index": _INT, "delta": {"type": "string"}}}

_RESPONSES = {
    "Usage": _USAGE,
    "ChatCompletion": _completion("chat.completion", {"message": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"const": "assistant"}, "content": _NULLABLE_TEXT,
                       "reasoning_content": _NULLABLE_TEXT,
                       "tool_calls": {"type": "array", "items": _TOOL_CALL}}}}),
    "Completion": _completion("text_completion", {"text": {"type": "string"}}),
    "ChatCompletionChunk": _completion("chat.completion.chunk", {"delta": {
        "type": "object", "properties": {"role": {"const": "assistant"},
                                         "content": {"type": "string"},
                                         "reasoning_content": {"type": "string"},
                                         "tool_calls": {"type": "array", "items": _TOOL_CALL_DELTA}}}},
        chunk=True),
    "CompletionChunk": _completion("text_completion", {"text": {"type": "string"}}, chunk=True),
    "Model": _MODEL,
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"enum": ["ok", "unavailable", "draining"]}}},
    "ResponseRequest": _RESPONSE_REQUEST,
    "Response": _RESPONSE,
    "ResponseEvent": _RESPONSE_EVENT,
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}},
}

# What each kind of route can answer besides 200 (413/415: the body; 429/503: admission).
_GENERATE_ERRORS = {400: "invalid request", 404: "unknown model", 413: "body over the size limit",
                    415: "body not JSON", 429: "over capacity; retry after Retry-After seconds",
                    503: "no healthy worker, or shutting down"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=name)}}}


def _error_responses(errors: dict[int, str], auth: bool) -> dict[str, Any]:
    """The error answers of a route (and 401, where API keys are required)."""
    errors = {**errors, **({401: "missing or invalid API key"} if auth else {})}
    return {str(code): {"description": why, "content": _json("Error")}
            for code, why in sorted(errors.items())}


def _generate(request: type, response: str, summary: str, auth: bool) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "operationId": response[0].lower() + response[1:],
        "requestBody": {"required": True, "content": _json(request.__name__)},
        "responses": {
            "200": {"description": "the completion; an SSE stream of chunks when stream is true",
                    "content": {**_json(response),
                                "text/event-stream": {"schema": _event_stream(response + "Chunk")}}},
            **_error_responses(_GENERATE_ERRORS, auth)}}}


def _served_values(model_name: str, vocab_size: int) -> dict[str, dict[str, Any]]:
    """What the ingress checks beyond the models' types, per request schema: the one model it
    serves (another name is a 404), a prompt that fits the vocabulary, and, for the parameters it
    does not support, the values that mean "off" (any other is a 400)."""
    null = {"type": "null"}

    def off(value: Any) -> dict[str, Any]:
        return {"anyOf": [{"const": value}, null]}

    def one(item: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "maxItems": 1, "items": item}

    text = {"type": "string", "minLength": 1}
    ids = {"type": "array", "minItems": 1,
           "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    common = {"model": {**off(model_name), "default": None}}
    return {
        "ChatCompletionRequest": {
            **common},
        "CompletionRequest": {
            **common, "prompt": {"anyOf": [text, ids, one(text), one(ids)]},
            "echo": {**off(False), "default": False}, "suffix": off("")},
    }


def _request_schemas(model_name: str, vocab_size: int) -> dict[str, Any]:
    """The request models' JSON schemas, their nested models hoisted into components."""
    schemas: dict[str, Any] = {}
    served = _served_values(model_name, vocab_size)
    for model in (oai.ChatCompletionRequest, oai.CompletionRequest):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        for name in model.NULL_IS_DEFAULT:   # null is taken as the default
            prop = schema["properties"][name]
            if {"type": "null"} in prop.get("anyOf", []):
                continue
            schema["properties"][name] = {"title": prop.pop("title"), "default": prop.pop("default", None),
                                          "anyOf": [prop, {"type": "null"}]}
        for name, values in served[model.__name__].items():
            schema["properties"][name] = {"title": schema["properties"][name]["title"], **values}
        schemas[model.__name__] = schema
    return schemas


def openapi_document(model_name: str, vocab_size: int, auth: bool) -> dict[str, Any]:
    """The document for a server of `model_name`; `auth`: whether it requires API keys."""
    secured = {"security": [{"bearer": []}]} if auth else {}
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generate(oai.ChatCompletionRequest, "ChatCompletion",
                                          "Create a chat completion", auth),
        "/v1/completions": _generate(oai.CompletionRequest, "Completion",
                                     "Create a text completion", auth),
        "/v1/responses": {"post": {
            "summary": "Create a response (OpenAI's Responses API, run as a chat; nothing is stored)",
            "operationId": "createResponse",
            "requestBody": {"required": True, "content": _json("ResponseRequest")},
            "responses": {
                "200": {"description": "the response; an SSE stream of typed events when stream is true",
                        "content": {**_json("Response"), "text/event-stream": {"schema": {
                            "type": "object", "required": ["event", "data"], "properties": {
                                "event": {"type": "string"}, "data": {
                                    "type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": _REF.format(model="ResponseEvent")}}}}}}},
                **_error_responses(_GENERATE_ERRORS, auth)}}},
        "/v1/responses/input_tokens": {"post": {
            "summary": "Count the prompt tokens a response request would take",
            "operationId": "countResponseInputTokens",
            "requestBody": {"required": True, "content": _json("ResponseRequest")},
            "responses": {
                "200": {"description": "the count", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "input_tokens"], "properties": {
                        "object": {"const": "response.input_tokens"}, "input_tokens": _INT}}}}},
                **_error_responses({code: why for code, why in _GENERATE_ERRORS.items()
                                    if code not in (429, 503)}, auth)}}},
        "/v1/responses/{response_id}": {method: {
            "summary": summary, "operationId": op,
            "parameters": [{"name": "response_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"404": {"description": "no response is stored here, so none is found",
                                  "content": _json("Error")}}}
            for method, summary, op in (
                ("get", "Retrieve a response (none is stored)", "retrieveResponse"),
                ("delete", "Delete a response (none is stored)", "deleteResponse"))},
        "/v1/models": {"get": {"summary": "List the served model", "operationId": "listModels",
                               "responses": {"200": {"description": "the model list",
                                                     "content": _json("ModelList")},
                                             **({"401": {"description": "missing or invalid API key",
                                                         "content": _json("Error")}} if auth else {})}}},
        "/v1/models/{model}": {"get": {
            "summary": "The served model", "operationId": "retrieveModel",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model", "content": _json("Model")},
                          "404": {"description": "not the served model", "content": _json("Error")},
                          **({"401": {"description": "missing or invalid API key",
                                      "content": _json("Error")}} if auth else {})}}},
        "/health": {"get": {"summary": "Readiness", "operationId": "health", "security": [],
                            "responses": {"200": {"description": "ready", "content": _json("Health")},
                                          "503": {"description": "not ready",
                                                  "content": _json("Health")}}},
                    "head": {"summary": "Readiness, the status code alone", "operationId": "healthHead",
                             "security": [], "responses": {"200": {"description": "ready"},
                                                           "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "security": [], "responses": {"200": {
                                 "description": "Prometheus text format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pdcluster", "version": "1",
                 "description": "OpenAI-compatible API of a prefill/decode-disaggregated cluster"},
        "paths": paths,
        "components": {"schemas": {**_request_schemas(model_name, vocab_size), **_RESPONSES},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        **secured,
    }
