"""OpenAI's Responses API without a server: a body becomes the chat request it means (messages,
tools, response format, logprobs), refusals name the Responses API's fields, and a chat answer's
deltas become output items and a numbered, well-ordered event stream."""
from __future__ import annotations

import pytest
from pdcluster.cluster.serve import openai_protocol as oai
from pdcluster.cluster.serve import responses_api as ra

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def _error(body) -> oai.OpenAIError:
    with pytest.raises(oai.OpenAIError) as info:
        ra.parse(body)
    return info.value


def test_a_string_input_with_instructions_is_a_system_and_a_user_message():
    req = ra.parse({"model": "m", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 7,
                    "temperature": 0, "stream": True})
    chat = req.chat
    assert [(m.role, m.text()) for m in chat.messages] == [("system", "Be brief."), ("user", "hi")]
    assert chat.requested_max_tokens() == 7 and chat.temperature == 0 and chat.stream
    assert not req.logprobs and chat.response_format is None and chat.tools is None
    assert req.echo["instructions"] == "Be brief." and req.echo["max_output_tokens"] == 7


def test_items_become_one_assistant_turn_per_text_and_its_calls_then_tool_answers():
    call = {"type": "function_call", "call_id": "call_a", "name": "get_weather",
            "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"}
    req = ra.parse({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                     {"type": "input_text", "text": "In Paris."}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                              "annotations": []}]},
        call, {**call, "call_id": "call_b", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "21 C"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "18 C"}]}],
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False})
    msgs = req.chat.messages
    assert [m.role for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert msgs[0].text() == "Weather?\nIn Paris."
    assert msgs[1].text() == "Checking."
    assert [(c.id, c.function.arguments) for c in msgs[1].tool_calls] == [
        ("call_a", '{"city": "Paris"}'), ("call_b", '{"city": "Lyon"}')]
    assert [(m.tool_call_id, m.text()) for m in msgs[2:]] == [("call_a", "21 C"), ("call_b", "18 C")]
    assert req.chat.tools[0].function.name == "get_weather"
    assert req.chat.tool_choice.function.name == "get_weather"
    assert req.chat.parallel_tool_calls is False
    # where each chat message came from: a refusal about one names its input item
    assert req.sources.messages == [("input.0", True), ("input.2", True), ("input.5", False),
                                    ("input.6", False)]
    assert msgs[1].reasoning_content is None   # the reasoning item had no text
    err = req.error(oai.OpenAIError(400, "messages.1.tool_calls.1.function.arguments must be a JSON "
                                    "object", param="messages.1.tool_calls.1.function.arguments"))
    assert (err.param, err.message) == ("input.4.arguments", "input.4.arguments must be a JSON object")


def test_a_reasoning_item_goes_back_with_the_assistant_turn_it_led_to():
    think = {"type": "reasoning", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Look it up."}]}
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    req = ra.parse({"tools": [WEATHER], "input": [
        {"role": "user", "content": "Weather?"}, think, call,
        {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
        {**think, "content": [{"type": "reasoning_text", "text": "Now answer."}]},
        {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}]})
    assert [(m.role, m.reasoning_content) for m in req.chat.messages] == [
        ("user", None), ("assistant", "Look it up."), ("tool", None), ("assistant", "Now answer."),
        ("user", None)]


def test_text_format_and_logprobs_become_chats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = ra.parse({"input": "x", "text": {"format": {"type": "json_schema", "name": "thing",
                                                     "schema": schema, "strict": True}},
                    "include": ["message.output_text.logprobs"], "top_logprobs": 3})
    assert req.chat.response_format.type == "json_schema"
    assert req.chat.response_format.json_schema.schema_ == schema
    assert req.chat.structured_output() is not None
    assert req.logprobs and req.chat.engine_logprobs() == 3
    assert ra.parse({"input": "x", "text": {"format": {"type": "json_object"}}}
                    ).chat.response_format.type == "json_object"


@pytest.mark.parametrize("body, param, code", [
    ({"input": "x", "store": True}, "store", "unsupported_parameter"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"input": "x", "background": True}, "background", "unsupported_parameter"),
    ({"input": "x", "truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_parameter"),
    ({"input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice.type",
     "unsupported_parameter"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort", "unsupported_parameter"),
    ({"input": "x", "reasoning": {"summary": "detailed"}}, "reasoning.summary", "unsupported_parameter"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include.0", "unsupported_parameter"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
    ({"input": "x", "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"input": "x", "typical_p": 0.5}, "typical_p", "unsupported_parameter"),   # chat's refusals hold
    ({}, "input", "missing"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input.0.content.0.type", "unsupported_parameter"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "unsupported_parameter"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "y"}]}, "input.0.call_id",
     "invalid_value"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "invalid_value"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata", "invalid_value"),
    ({"input": "x", "truncation": "yes"}, "truncation", "invalid_value"),
    ({"input": "x", "service_tier": "flex"}, "service_tier", "unsupported_parameter"),
    ({"input": "x", "store": "yes"}, "store", "invalid_value"),
    # chat's fields are no Responses API fields: refused, never dropped
    ({"input": "x", "max_tokens": 3}, "max_tokens", "unknown_parameter"),
    ({"input": "x", "response_format": {"type": "json_object"}}, "response_format", "unknown_parameter"),
    ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "messages", "unknown_parameter"),
    ({"input": "x", "n": 2}, "n", "unknown_parameter"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "t"}}}, "text.format.schema",
     "missing"),
    ({"input": [{"content": "hi"}]}, "input.0.type", "missing"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
     "input.1.call_id", "invalid_value"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}],
      "instructions": "x"}, "input.0.encrypted_content", "unsupported_parameter"),
    # chat's checks, in the Responses API's names
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "t",
                                        "schema": {"type": "objec"}}}}, "text.format.schema",
     "invalid_value"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": {"type": "array"}}]}, "tools.0.parameters",
     "invalid_value"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice", "invalid_value"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}, "input.1.content",
     "invalid_value"),
])
def test_refusals_name_the_responses_api_field(body, param, code):
    err = _error(body)
    assert (err.status, err.param, err.code) == (400, param, code), err.message
    if code != "unknown_parameter":   # no chat names in the Responses API's refusals
        assert "messages" not in err.message and "max_completion_tokens" not in err.message


def test_a_refusal_after_validation_names_the_input_item_its_message_came_from():
    req = ra.parse({"instructions": "sys", "input": [{"role": "user", "content": "a"},
                                                     {"role": "user", "content": "b"}]})
    err = req.error(oai.OpenAIError(400, "messages.2.content: too long", param="messages.2.content"))
    assert (err.param, err.message) == ("input.1.content", "input.1.content: too long")
    assert req.error(oai.OpenAIError(400, "the prompt is long", param="messages")).param == "input"
    assert req.error(oai.OpenAIError(400, "x", param="messages.0")).param == "instructions"


def _types(events):
    return [e["type"] for e in events]


def test_output_items_stream_in_order_with_numbered_events():
    items = ra.OutputItems()
    events = items.feed([{"reasoning_content": "Think"}], [])
    events += items.feed([{"reasoning_content": "ing."}, {"content": "\n"}], [])
    lp = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    events += items.feed([], lp)          # a token whose text is held back
    events += items.feed([{"content": "Hi"}], [])
    events += items.feed([{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": ""}}]},
                          {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}], [])
    events += items.feed([{"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}], [])
    events += items.close("completed")
    assert _types(events) == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    reasoning, message, call = items.items
    assert reasoning["content"][0]["text"] == "Thinking."
    # the whitespace between the reasoning and the text is the message's, with the held logprob
    assert message["content"][0]["text"] == "\nHi" and message["content"][0]["logprobs"] == lp
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "f", '{"a": 1}')
    assert all(i["status"] == "completed" for i in items.items)
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[2]["arguments"] == "" and added[2]["status"] == "in_progress"


def _lp(token: str) -> dict:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


def test_output_text_logprobs_are_its_own_tokens_only():
    items = ra.OutputItems()
    items.feed([{"reasoning_content": "Hmm"}], [_lp("<think>"), _lp("Hmm")])   # reasoning only
    # one step ends the reasoning and starts the text: the text's tokens are the last ones
    items.feed([{"reasoning_content": "."}, {"content": "Hi there"}],
               [_lp("."), _lp("</think>"), _lp("Hi"), _lp(" there")])
    items.feed([], [_lp("\xe2")])                 # part of a character: its text comes next step
    items.feed([{"content": "\u2014!"}], [_lp("!")])
    items.feed([{"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                 "function": {"name": "f", "arguments": "{}"}}]}], [_lp("<tool_call>")])
    items.close("completed")
    message = next(i for i in items.items if i["type"] == "message")
    assert [e["token"] for e in message["content"][0]["logprobs"]] == ["Hi", " there", "\xe2", "!"]


def test_whitespace_before_a_call_is_no_message_but_a_blank_answer_is_one():
    items = ra.OutputItems()
    items.feed([{"content": "\n"}, {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]}], [])
    items.close("completed")
    assert [i["type"] for i in items.items] == ["function_call"]

    blank = ra.OutputItems()
    blank.feed([{"content": " "}], [])
    events = blank.close("incomplete")
    assert [i["type"] for i in blank.items] == ["message"]
    assert blank.items[0]["content"][0]["text"] == " " and blank.items[0]["status"] == "incomplete"
    assert _types(events)[-1] == "response.output_item.done"


def test_usage_in_the_responses_api_names():
    use = ra.usage(oai.usage(10, 4, 6, reasoning_tokens=2))
    assert use == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
                   "output_tokens": 4,
                   "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 14}


def _document_validator(model: str):
    import jsonschema
    from pdcluster.cluster.serve.openapi import openapi_document

    doc = openapi_document("m", 100, auth=False)
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}",
                                            "components": doc["components"]})


def test_the_openapi_document_describes_the_requests_parse_takes():
    described = _document_validator("ResponseRequest")
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    accepted = [
        {"input": "x"},
        {"model": "m", "instructions": "sys", "max_output_tokens": 5, "temperature": 0.5, "top_p": 0.9,
         "stream": True, "store": False, "truncation": "disabled", "service_tier": "auto",
         "metadata": {"k": "v"}, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
         "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                   {"type": "reasoning", "summary": []}, call,
                   {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
         "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
         "parallel_tool_calls": False,
         "text": {"format": {"type": "json_object"}, "verbosity": "medium"}},
        {"input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                   {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]}, call,
                   {"role": "user", "content": "ok"}],
         "tool_choice": "auto", "reasoning": {"effort": None, "summary": "auto"},
         "include": ["reasoning.encrypted_content"],
         "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}},
    ]
    for body in accepted:
        ra.parse(body)
        assert described.is_valid(body), list(described.iter_errors(body))
    refused = [{"input": "x", "store": True}, {"input": "x", "background": True},
               {"input": "x", "truncation": "auto"}, {"input": "x", "include": ["file_search_call.results"]},
               {"input": "x", "text": {"verbosity": "low"}},
               {"input": "x", "tools": [{"type": "web_search"}]},
               {"input": []}, {"input": 5}, {"input": "x", "max_output_tokens": 0},
               {"input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}},
               {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
               {"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
               {"input": "x", "text": {"format": {"type": "json_schema", "name": "a b"}}},
               {"input": "x", "metadata": {"k" * 65: "v"}}, {"input": "x", "reasoning": {"effort": "low"}},
               {"input": "x", "max_tokens": 3}, {"input": [{"content": "hi"}]},
               {"input": "x", "text": {"format": {"type": "json_schema", "name": "t"}}},
               {"input": [{"type": "reasoning", "encrypted_content": "gAAAA"}]}]
    for body in refused:
        with pytest.raises(oai.OpenAIError):
            ra.parse(body)
        assert not described.is_valid(body), body
