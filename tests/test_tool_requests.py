"""Tools on the request side, without a server: what OpenAI refuses is a 400 naming the field, and
tool calls and results become chat-template messages (the model's own, or the fallback prompt's)."""
from __future__ import annotations

import json

import pytest
from pdcluster.cluster.serve import openai_protocol as oai
from pdcluster.cluster.serve.tool_calls import FALLBACK_TOOLS_PROMPT

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]


def _req(**fields) -> oai.ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **fields}
    return oai.parse(oai.ChatCompletionRequest, json.dumps(body).encode(), 1 << 20)


def _error(**fields) -> oai.OpenAIError:
    with pytest.raises(oai.OpenAIError) as info:
        _req(**fields)
    assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


@pytest.mark.parametrize("fields, param, says", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]},
     "tools.0.function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "must describe an object"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", ""),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", ""),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tool_choice": "always"}, "tool_choice", ""),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set tools"),
])
def test_bad_tools_are_400_naming_the_field(fields, param, says):
    err = _error(**fields)
    assert err.param == param
    assert says.lower() in err.message.lower()


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "call_9", "content": "x"}], "messages.0.tool_call_id"),
    ([*HISTORY[:2], {"role": "tool", "content": "x"}], "messages.2.tool_call_id"),
    ([HISTORY[0], {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}],
     "messages.1.tool_calls.0.function.arguments"),
    ([HISTORY[0], {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}]}],
     "messages.1.tool_calls.0.function.arguments"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages.0.tool_calls"),
])
def test_malformed_tool_messages_are_400(messages, param):
    req = _req(messages=messages)
    with pytest.raises(oai.OpenAIError) as info:
        req.chat()
    assert info.value.status == 400 and info.value.param == param


def test_tool_history_for_a_template_with_tools():
    msgs = _req(messages=HISTORY).chat(native_tools=True)
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                       "content": "18 C, sunny"}
    assert all("tools" not in m["content"] for m in msgs if m["content"])  # tools go to the template


def test_tool_history_and_tools_for_a_template_without_tools():
    msgs = _req(messages=[{"role": "system", "content": "Be brief."}, *HISTORY]).chat(native_tools=False)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in msgs[0]["content"]
    assert FALLBACK_TOOLS_PROMPT.splitlines()[-1] in msgs[0]["content"]  # how to write a call
    assert "<tool_call>\n{\"name\": <function-name>" in msgs[0]["content"]
    call = msgs[2]["content"]
    assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    assert json.loads(call.split("\n")[1]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert msgs[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>"
    # tool_choice "none": the model is not told of the tools
    none = _req(messages=HISTORY, tool_choice="none")
    assert not none.uses_tools and "# Tools" not in none.chat(native_tools=False)[0]["content"]


def test_usage_counts_reasoning_tokens_when_asked():
    assert "completion_tokens_details" not in oai.usage(3, 4)
    assert oai.usage(3, 4, 0, 2)["completion_tokens_details"] == {"reasoning_tokens": 2}


def test_an_assistant_turns_reasoning_reaches_the_template_and_only_an_assistant_has_one():
    thought = {"role": "assistant", "content": "Let me check.", "reasoning_content": "A tool knows.",
               "tool_calls": [CALL]}
    msgs = _req(messages=[HISTORY[0], thought, *HISTORY[2:]]).chat(native_tools=True)
    assert msgs[1]["reasoning_content"] == "A tool knows." and "reasoning_content" not in msgs[0]
    with pytest.raises(oai.OpenAIError) as info:
        oai.validate(oai.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x",
                                                              "reasoning_content": "y"}]})
    assert info.value.param == "messages.0"
