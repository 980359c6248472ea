"""OpenAI wire format without a server: request validation becomes OpenAI error bodies with the right
status and param, requests map onto engine SamplingParams, and responses have the fields clients read."""
from __future__ import annotations

import json
import pickle

import pytest
from pdcluster.cluster.serve import openai_protocol as oai
from pdcluster.engine.outputs import TokenLogprob

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _parse_error(model, body, max_bytes: int = 1 << 20) -> oai.OpenAIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(oai.OpenAIError) as info:
        oai.parse(model, raw, max_bytes)
    return info.value


@pytest.mark.parametrize("body, status, param, code", [
    ({**CHAT, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({**CHAT, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "m", "messages": []}, 400, "messages", "invalid_value"),
    ({"model": "m"}, 400, "messages", "invalid_value"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ({**CHAT, "messages": [{"role": "user"}]}, 400, "messages.0", "invalid_value"),
    ({**CHAT, "messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]}, 400,
     "messages.0", "invalid_value"),
    ({**CHAT, "messages": [*CHAT["messages"], {"role": "assistant"}]}, 400, "messages.1",
     "invalid_value"),
    ({**CHAT, "messages": [{"role": "user", "content": []}]}, 400, "messages.0.content", "invalid_value"),
    ({**CHAT, "top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type", "invalid_value"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objec"}}}}, 400, "response_format.json_schema.schema",
     "invalid_value"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", None),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "array", "items": {"type": "integer"},
                                                "uniqueItems": True}}}}, 400,
     "response_format.json_schema.schema", "invalid_value"),
    ({**CHAT, "logit_bias": {"12": 101}}, 400, "logit_bias.12", "invalid_value"),
    ({**CHAT, "presence_penalty": -2.5}, 400, "presence_penalty", "invalid_value"),
    ({**CHAT, "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
])
def test_invalid_chat_requests_are_400_with_an_openai_body(body, status, param, code):
    err = _parse_error(oai.ChatCompletionRequest, body)
    assert err.status == status
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error",
                                    "param": param, "code": code}}
    assert err.message


COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize("model, body, param", [
    (oai.ChatCompletionRequest, {**CHAT, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (oai.ChatCompletionRequest, {**CHAT, "function_call": "auto"}, "function_call"),
    (oai.ChatCompletionRequest, {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    (oai.ChatCompletionRequest, {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (oai.ChatCompletionRequest, {**CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
    (oai.ChatCompletionRequest, {**CHAT, "guided_json": {"type": "object"}}, "guided_json"),
    (oai.ChatCompletionRequest, {**CHAT, "prediction": {"type": "content", "content": "x"}}, "prediction"),
    (oai.CompletionRequest, {**COMPLETION, "guided_regex": "a+"}, "guided_regex"),
    (oai.CompletionRequest, {**COMPLETION, "best_of": 3}, "best_of"),
    (oai.CompletionRequest, {**COMPLETION, "stop_token_ids": [2]}, "stop_token_ids"),
    (oai.ChatCompletionRequest, {**CHAT, "skip_special_tokens": False}, "skip_special_tokens"),
    (oai.ChatCompletionRequest, {**CHAT, "continue_final_message": True}, "continue_final_message"),
    (oai.CompletionRequest, {**COMPLETION, "n": 2, "best_of": 3}, "best_of"),
    # other servers' samplers, set to do something
    (oai.ChatCompletionRequest, {**CHAT, "typical_p": 0.5}, "typical_p"),
    (oai.ChatCompletionRequest, {**CHAT, "mirostat": 2}, "mirostat"),
    (oai.ChatCompletionRequest, {**CHAT, "repeat_penalty": 1.3}, "repeat_penalty"),
    (oai.CompletionRequest, {**COMPLETION, "n_predict": 5}, "n_predict"),
    (oai.CompletionRequest, {**COMPLETION, "max_tokens": 4, "n_predict": 5}, "n_predict"),
    (oai.ChatCompletionRequest, {**CHAT, "top_n_sigma": 1.5}, "top_n_sigma"),
    (oai.ChatCompletionRequest, {**CHAT, "typical_p": True}, "typical_p"),
    # n_predict against the limit the request uses: max_completion_tokens over max_tokens
    (oai.ChatCompletionRequest, {**CHAT, "max_completion_tokens": 2, "max_tokens": 3, "n_predict": 3},
     "n_predict"),
    (oai.CompletionRequest, {**COMPLETION, "grammar": 'root ::= "a"'}, "grammar"),
    (oai.ChatCompletionRequest, {**CHAT, "json_schema": {"type": "object"}}, "json_schema"),
    (oai.ChatCompletionRequest, {**CHAT, "xtc_probability": 0.5}, "xtc_probability"),
])
def test_fields_that_would_change_the_answer_are_refused_not_ignored(model, body, param):
    err = _parse_error(model, body)
    assert (err.status, err.param, err.code) == (400, param, "unsupported_parameter")


@pytest.mark.parametrize("model, body", [
    (oai.ChatCompletionRequest, {**CHAT, "modalities": ["text"], "functions": None, "store": True,
                                 "metadata": {"k": "v"}, "service_tier": "auto", "vendor_extra": 1}),
    (oai.ChatCompletionRequest, {**CHAT, "functions": [], "function_call": "none", "min_p": 0.0,
                                 "skip_special_tokens": True, "reasoning_effort": None}),
    (oai.CompletionRequest, {**COMPLETION, "n": 2, "best_of": 2}),
    # llama.cpp clients send every sampler at its off value
    (oai.ChatCompletionRequest, {**CHAT, "typical_p": 1.0, "mirostat": 0, "mirostat_tau": 5,
                                 "repeat_penalty": 1, "n_predict": -1, "top_n_sigma": -1,
                                 "dry_multiplier": 0.0, "grammar": ""}),
    # ... or at values those servers also take as off, or n_predict beside the same max_tokens
    (oai.ChatCompletionRequest, {**CHAT, "typical_p": 1.5, "top_n_sigma": 0, "xtc_probability": -1,
                                 "n_probs": 0, "max_tokens": 50, "n_predict": 50}),
    (oai.CompletionRequest, {**COMPLETION, "n_predict": -2}),
    (oai.ChatCompletionRequest, {**CHAT, "n_predict": -1.0, "mirostat": 0.0, "repeat_penalty": 1.0,
                                 "max_completion_tokens": 3, "max_tokens": 2}),
    (oai.ChatCompletionRequest, {**CHAT, "max_completion_tokens": 3, "n_predict": 3.0}),
])
def test_fields_that_ask_nothing_new_are_accepted(model, body):
    oai.parse(model, json.dumps(body).encode(), 1 << 20)


@pytest.mark.parametrize("model, body", [(oai.ChatCompletionRequest, CHAT),
                                         (oai.CompletionRequest, COMPLETION)])
def test_stream_options_need_a_stream(model, body):
    err = _parse_error(model, {**body, "stream_options": {"include_usage": True}})
    assert (err.status, err.param) == (400, "stream_options")
    oai.parse(model, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
              1 << 20)


def test_a_schema_the_grammar_cannot_enforce_is_refused_only_when_strict():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for strict in (None, False):
        body = {**CHAT, "response_format": {**fmt, "json_schema": {**fmt["json_schema"], "strict": strict}}}
        req = oai.parse(oai.ChatCompletionRequest, json.dumps(body).encode(), 1 << 20)
        assert json.loads(req.sampling_params(9).structured_output.grammar) == schema   # best effort
    err = _parse_error(oai.ChatCompletionRequest, {**CHAT, "response_format": {
        **fmt, "json_schema": {**fmt["json_schema"], "strict": True}}})
    assert err.param == "response_format.json_schema.schema" and "uniqueItems" in err.message


def test_completions_take_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = oai.parse(oai.CompletionRequest, json.dumps({**COMPLETION, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}).encode(), 1 << 20)
    params = req.sampling_params(16)
    assert params.structured_output.kind == "json_schema"
    assert json.loads(params.structured_output.grammar) == schema


def test_body_over_the_limit_is_413():
    err = _parse_error(oai.ChatCompletionRequest, {**CHAT, "pad": "x" * 2000}, max_bytes=1024)
    assert err.status == 413 and err.body()["error"]["code"] == "request_too_large"


def test_rate_limit_error_carries_retry_after_and_survives_pickling():
    err = oai.OpenAIError(429, "busy", code="queue_full", retry_after_s=2.4)
    assert err.headers() == {"Retry-After": "2"}
    assert oai.OpenAIError(429, "busy", retry_after_s=0.1).headers() == {"Retry-After": "1"}
    assert err.body()["error"]["type"] == "rate_limit_error"
    copy = pickle.loads(pickle.dumps(err))  # Ray ships exceptions between processes this way
    assert (copy.status, copy.message, copy.code, copy.retry_after_s) == (429, "busy", "queue_full", 2.4)


def test_chat_request_maps_to_sampling_params():
    req = oai.parse(oai.ChatCompletionRequest, json.dumps({
        **CHAT, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "END", "max_completion_tokens": 9,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "some_vendor_field": 1}).encode(), 1 << 20)
    assert req.requested_max_tokens() == 9
    assert req.include_usage and req.stream
    assert req.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    p = req.sampling_params(9)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.ignore_eos) == \
        (9, 0.0, 0.5, 7, ("END",), True)


def test_sampling_extensions_map_to_sampling_params():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = oai.validate(oai.ChatCompletionRequest, {
        **CHAT, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": -1,
        "repetition_penalty": 1.2, "logit_bias": {"7": 100, "3": -100.0}, "min_tokens": 2,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "a", "schema": schema, "strict": True}}})
    p = chat.sampling_params(9)
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == \
        (3, 0.5, -1.0, 1.2, 2)
    assert p.logit_bias == ((3, -100.0), (7, 100.0))
    assert p.structured_output.kind == "json_schema" and json.loads(p.structured_output.grammar) == schema
    plain = oai.validate(oai.ChatCompletionRequest, {**CHAT, "logprobs": True}).sampling_params(9)
    assert plain.logprobs == 0 and plain.structured_output is None
    obj = oai.validate(oai.ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}})
    assert obj.sampling_params(9).structured_output.kind == "json_object"
    comp = oai.validate(oai.CompletionRequest, {"prompt": "x", "logprobs": 2})
    assert comp.sampling_params(9).logprobs == 2
    with pytest.raises(oai.OpenAIError) as info:   # min_tokens beyond max_tokens
        oai.validate(oai.ChatCompletionRequest, {**CHAT, "min_tokens": 10}).sampling_params(9)
    assert info.value.status == 400 and info.value.param == "min_tokens"


def test_logprobs_shapes():
    entries = [TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.5))), TokenLogprob(2, -2.0, ((1, -0.1), (2, -2.0)))]
    text = {1: "Hé", 2: "!"}.__getitem__
    chat = oai.chat_logprobs(entries, text)
    assert chat == {"refusal": None, "content": [
        {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169],
         "top_logprobs": [{"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]},
                          {"token": "!", "logprob": -1.5, "bytes": [33]}]},
        {"token": "!", "logprob": -2.0, "bytes": [33],
         "top_logprobs": [{"token": "Hé", "logprob": -0.1, "bytes": [72, 195, 169]},
                          {"token": "!", "logprob": -2.0, "bytes": [33]}]}]}
    # a token's own bytes, where they are part of a character
    raw = oai.chat_logprobs(entries[:1], {1: "bytes:\\xf0\\x9f", 2: "!"}.__getitem__,
                            {1: b"\xf0\x9f", 2: b"!"}.__getitem__)["content"][0]
    assert raw["token"] == "bytes:\\xf0\\x9f" and raw["bytes"] == [0xf0, 0x9f]
    assert [t["bytes"] for t in raw["top_logprobs"]] == [[0xf0, 0x9f], [33]]
    offsets = oai.TextOffsets()
    offsets.next(b"Hello")   # an earlier chunk's token
    comp = oai.completion_logprobs(entries, text, offsets)
    assert comp == {"tokens": ["Hé", "!"], "token_logprobs": [-0.5, -2.0],
                    "top_logprobs": [{"Hé": -0.5, "!": -1.5}, {"Hé": -0.1, "!": -2.0}],
                    "text_offset": [5, 7]}


def test_text_offsets_count_characters_across_tokens_and_chunks():
    """An emoji in three tokens: they all start where it does, the next token one character on,
    however the tokens are split into chunks."""
    pieces = [b"a", b"\xf0\x9f", b"\x8d", b"\x95", b" b"]
    whole = oai.TextOffsets()
    assert [whole.next(p) for p in pieces] == [0, 1, 1, 1, 2]
    chunked, got = oai.TextOffsets(), []
    for chunk in (pieces[:2], pieces[2:4], pieces[4:]):
        entries = [TokenLogprob(i, -1.0, ()) for i in range(len(chunk))]
        got += oai.completion_logprobs(entries, lambda t: "x", chunked, chunk.__getitem__)["text_offset"]
    assert got == [0, 1, 1, 1, 2]
    broken = oai.TextOffsets()   # a character that never finishes shows as one U+FFFD
    assert [broken.next(p) for p in (b"\xf0\x9f", b"a", b"b")] == [0, 1, 2]


def test_completion_top_logprobs_hold_the_sampled_token():
    sampled_outside = [TokenLogprob(3, -4.0, ((1, -0.5), (2, -1.5)))]
    text = {1: "a", 2: "b", 3: "c"}.__getitem__
    tops = oai.completion_logprobs(sampled_outside, text)["top_logprobs"]
    assert tops == [{"a": -0.5, "b": -1.5, "c": -4.0}]
    sampled_inside = [TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.5)))]
    assert oai.completion_logprobs(sampled_inside, text)["top_logprobs"] == [{"a": -0.5, "b": -1.5}]
    only_sampled = [TokenLogprob(3, -4.0, ())]   # logprobs 0: the sampled token alone
    assert oai.completion_logprobs(only_sampled, text)["top_logprobs"] == [{"c": -4.0}]


def test_defaults_follow_openai():
    chat = oai.parse(oai.ChatCompletionRequest, json.dumps(CHAT).encode(), 1 << 20)
    assert chat.requested_max_tokens() is None  # chat: until the context is full
    p = chat.sampling_params(100)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    tuned = oai.parse(oai.ChatCompletionRequest, json.dumps({**CHAT, "min_p": 0.05}).encode(), 1 << 20)
    assert tuned.sampling_params(100).min_p == 0.05
    comp = oai.parse(oai.CompletionRequest, b'{"prompt": "x"}', 1 << 20)
    assert comp.requested_max_tokens() == 16  # completions: OpenAI's default of 16


def test_a_schema_beside_json_object_is_refused_not_dropped():
    fmt = {"type": "json_object", "schema": {"type": "object", "required": ["a"]}}
    err = _parse_error(oai.ChatCompletionRequest, {**CHAT, "response_format": fmt})
    assert (err.status, err.param) == (400, "response_format.schema")
    assert "json_schema" in err.message


def test_grpc_prompts_without_max_tokens_run_to_the_end_of_the_context():
    req = oai.validate(oai.GrpcCompletionRequest, {"prompt": "x", "max_tokens": None, "min_tokens": 17})
    assert (req.requested_max_tokens(), req.min_tokens) == (None, 17)
    assert oai.validate(oai.GrpcCompletionRequest, {"prompt": "x", "max_tokens": 5}).requested_max_tokens() == 5
    # the HTTP API keeps OpenAI's default
    assert oai.validate(oai.CompletionRequest, {"prompt": "x", "max_tokens": None}).requested_max_tokens() == 16


def test_best_of_below_n_is_named_as_wrong_not_as_unsupported():
    err = _parse_error(oai.CompletionRequest, {**COMPLETION, "n": 3, "best_of": 2})
    assert (err.status, err.param, err.code) == (400, "best_of", "invalid_value")
    assert "at least n" in err.message


def test_a_participants_name_reaches_the_template():
    chat = {**CHAT, "messages": [{"role": "system", "content": "s", "name": "ops"},
                                 {"role": "user", "content": "hi", "name": "ann"},
                                 {"role": "assistant", "content": "hello"}]}
    req = oai.parse(oai.ChatCompletionRequest, json.dumps(chat).encode(), 1 << 20)
    assert [m.get("name") for m in req.chat()] == ["ops", "ann", None]


def test_a_participants_name_reaches_the_template_over_grpc_too():
    from pdcluster.cluster.serve.grpc_service import chat_message
    from pdcluster.proto import inference_pb2 as pb

    messages = [chat_message(pb.ChatMessage(role="user", content="hi", name="ann")),
                chat_message(pb.ChatMessage(role="user", content="and?"))]
    req = oai.validate(oai.ChatCompletionRequest, {"model": "m", "messages": messages})
    assert [m.get("name") for m in req.chat()] == ["ann", None]


def test_text_parts_are_joined_one_per_line_as_vllm_joins_them():
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}]}
    req = oai.parse(oai.ChatCompletionRequest, json.dumps(parts).encode(), 1 << 20)
    assert req.chat()[0]["content"] == "a\nb"


@pytest.mark.parametrize("model, body", [(oai.ChatCompletionRequest, CHAT), (oai.CompletionRequest, COMPLETION)])
def test_null_means_the_default_where_openai_makes_a_field_nullable(model, body):
    # the openai client sends null for an argument given as None
    nulls = {"stream": None, "n": None, "ignore_eos": None, "min_tokens": None, "max_tokens": None,
             **({"echo": None} if model is oai.CompletionRequest else {})}
    req = oai.parse(model, json.dumps({**body, **nulls}).encode(), 1 << 20)
    default = oai.parse(model, json.dumps(body).encode(), 1 << 20)
    assert (req.stream, req.n, req.ignore_eos, req.min_tokens) == (False, 1, False, 0)
    assert req.requested_max_tokens() == default.requested_max_tokens()   # 16 for completions


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_schemas_nested_past_what_the_checks_recurse_through_are_400():
    fmt = oai.ResponseFormat(type="json_schema", json_schema=oai.JSONSchemaFormat(
        name="x", schema=_nested(3000), strict=True))
    with pytest.raises(oai.OpenAIError) as info:
        fmt.structured_output()
    assert (info.value.status, info.value.param) == (400, "response_format.json_schema.schema")
    tools = [{"type": "function", "function": {"name": "f", "parameters": _nested(150)}}]
    err = _parse_error(oai.ChatCompletionRequest, {**CHAT, "tools": tools})
    assert (err.status, err.param) == (400, "tools.0.function.parameters") and "nests" in err.message


def test_tool_choice_other_than_none_needs_tools():
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        assert _parse_error(oai.ChatCompletionRequest, {**CHAT, "tool_choice": choice}).param == "tool_choice"
    for ok in ({"tool_choice": "none"}, {"tool_choice": "auto", "tools": []}):   # the latter as vLLM takes it
        oai.parse(oai.ChatCompletionRequest, json.dumps({**CHAT, **ok}).encode(), 1 << 20)


@pytest.mark.parametrize("key", ["١٢", "１２", "²", "9" * 5000])
def test_logit_bias_keys_are_ascii_token_ids(key):
    req = oai.parse(oai.ChatCompletionRequest, json.dumps({**CHAT, "logit_bias": {key: 1}}).encode(), 1 << 20)
    with pytest.raises(oai.OpenAIError) as info:
        req.logit_bias_ids()
    assert (info.value.status, info.value.param) == (400, "logit_bias")


@pytest.mark.parametrize("prompt, expected", [
    ("hello", "hello"), ([1, 2, 3], [1, 2, 3]), (["hello"], "hello"), ([[4, 5]], [4, 5])])
def test_completion_accepts_one_prompt_in_every_form(prompt, expected):
    req = oai.validate(oai.CompletionRequest, {"prompt": prompt})
    assert req.single_prompt() == expected


@pytest.mark.parametrize("prompt", [["a", "b"], "", []])
def test_completion_rejects_batches_and_empty_prompts(prompt):
    with pytest.raises(oai.OpenAIError) as info:
        oai.validate(oai.CompletionRequest, {"prompt": prompt}).single_prompt()
    assert info.value.status == 400 and info.value.param == "prompt"


def test_response_shapes():
    use = oai.usage(10, 5, cached_tokens=4)
    assert use == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                   "prompt_tokens_details": {"cached_tokens": 4}}
    full = oai.chat_completion("id1", "m", 1, [oai.chat_choice("hi", "stop")], use)
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert full["choices"][0]["finish_reason"] == "stop" and full["usage"] == use
    chunk = oai.chat_chunk("id1", "m", 1, {"content": "h"})
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "h"}
    assert oai.completion("id2", "m", 1, [oai.completion_choice("t", "length")], use)["choices"][0]["text"] == "t"
    assert oai.chat_chunk("id1", "m", 1, {"content": "h"}, index=2)["choices"][0]["index"] == 2
    assert oai.usage_chunk("id1", "m", 1, "chat.completion.chunk", use)["choices"] == []
    assert oai.sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(oai.sse(chunk)[len("data: "):]) == chunk


def test_api_keys_name_tenants_and_guard_requests():
    keys = oai.parse_api_keys(" alpha:k1, k2 ,,beta: a2V5==")
    assert keys == {"k1": "alpha", "k2": "key-1", "a2V5==": "beta"}
    assert oai.tenant_for("Bearer k1", keys) == "alpha"
    assert oai.tenant_for("Bearer k2", keys) == "key-1"
    # missing, wrong key, no scheme, a lowercase or other scheme, a prefix of a key, an empty key
    for bad in (None, "", "Bearer nope", "k1", "bearer k1", "BEARER k1", "Basic k1", "Bearer k",
                "Bearer ", "Bearer"):
        with pytest.raises(oai.OpenAIError) as info:
            oai.tenant_for(bad, keys)
        assert info.value.status == 401 and info.value.body()["error"]["type"] == "authentication_error"
    assert oai.tenant_for(None, {}) is None  # no keys configured: open
    assert oai.tenant_for(["Bearer k1"], keys) == "alpha"   # the headers as sent
    with pytest.raises(oai.OpenAIError) as info:             # two: which would count is a guess
        oai.tenant_for(["Bearer k1", "Bearer k2"], keys)
    assert info.value.status == 401


@pytest.mark.parametrize("entries, says", [
    ("alpha:", "empty key"), ("alpha: ,k2", "empty key"), (":k1", "empty tenant"),
    ("k1,beta:k1", "repeats")])
def test_api_key_entries_that_would_weaken_auth_are_refused_at_load(entries, says):
    with pytest.raises(ValueError, match=says):
        oai.parse_api_keys(entries)


@pytest.mark.parametrize("raw, says", [
    (b'{"prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"prompt": "x", "top_p": Infinity}', "Infinity"),
    (b'{"prompt": ' + b"[" * 100_000, "recursion"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"prompt": "\xff"}', "utf-8"),
    (b'{"prompt": "a\\udc00"}', "surrogate"),
    (b'{"prompt": "a\xed\xa0\x80b"}', "utf-8"),    # a surrogate spelled in (invalid) UTF-8 bytes
    ('{"prompt": "x"}'.encode("utf-16"), "utf-8"),   # JSON in UTF-16, which json.loads would take
])
def test_bodies_python_would_choke_on_are_400(raw, says):
    err = _parse_error(oai.CompletionRequest, raw)
    assert err.status == 400 and says.lower() in err.message.lower()


@pytest.mark.parametrize("field, value, param", [
    ("max_tokens", True, "max_tokens"), ("max_tokens", "5", "max_tokens"),
    ("max_tokens", 2.5, "max_tokens"), ("temperature", "0.5", "temperature"),
    ("stream", "yes", "stream"), ("model", 7, "model"), ("seed", 1 << 64, "seed"),
    ("top_k", 1 << 40, "top_k"), ("min_p", 1.5, "min_p"), ("min_p", -0.1, "min_p"),
    ("stop", [f"s{i}" for i in range(17)], "stop"),
    ("stop", ["ok", ""], "stop.1"), ("prompt", [1, "a"], "prompt.1"),
])
def test_types_are_strict_and_values_bounded(field, value, param):
    err = _parse_error(oai.CompletionRequest, {"prompt": "x", field: value})
    assert (err.status, err.param) == (400, param), err.message


def test_an_integral_json_number_is_an_integer():
    req = oai.validate(oai.CompletionRequest, {"prompt": [1.0, 2], "max_tokens": 3.0, "seed": 7.0})
    assert (req.prompt, req.max_tokens, req.seed) == ([1, 2], 3, 7)


@pytest.mark.parametrize("content_type, encoding, length, status", [
    ("text/plain", None, None, 415), ("application/x-www-form-urlencoded", None, None, 415),
    ("application/json", "gzip", None, 415), ("application/json", None, str(2 << 20), 413),
])
def test_body_headers_are_checked_before_the_body_is_read(content_type, encoding, length, status):
    with pytest.raises(oai.OpenAIError) as info:
        oai.check_body_headers(content_type, encoding, length, 1 << 20)
    assert info.value.status == status and info.value.body()["error"]["type"] == "invalid_request_error"
    for ok in ("application/json", "application/json; charset=utf-8", None, "application/vnd.x+json"):
        oai.check_body_headers(ok, None, "10", 1 << 20)


def test_openapi_document_describes_the_validated_models():
    from pdcluster.cluster.serve.openapi import openapi_document

    doc = openapi_document("m", 100, auth=True)
    schemas = doc["components"]["schemas"]
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["anyOf"][0] == {"const": "m"}
    ids = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, 99)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "415", "429"} <= set(chat["responses"])
    open_doc = openapi_document("m", 100, auth=False)
    assert "401" not in open_doc["paths"]["/v1/completions"]["post"]["responses"]
