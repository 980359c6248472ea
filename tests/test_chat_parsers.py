"""Reasoning and tool-call parsers on model-output fixtures of each format, whole and streamed: a
stream split at any character boundary (and one character at a time) adds up to the whole answer."""
import json

import pytest
from pdcluster.cluster.serve.chat_output import ChatOutput, default_parsers
from pdcluster.cluster.serve.reasoning_parsers import reasoning_parser
from pdcluster.cluster.serve.tool_parsers import tool_call_format

WEATHER = {"city": "Paris", "days": [1, 2], "unit": {"c": True}}
TIME = {"tz": "Europe/Paris"}
DS_CALL = ("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>")


def _ds(calls):
    body = "".join(DS_CALL.format(name=n, args=json.dumps(a)) for n, a in calls)
    return f"<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"


def _kimi(calls):
    body = "".join(f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{json.dumps(a)}"
                   f"<|tool_call_end|>" for i, (n, a) in enumerate(calls))
    return f"<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


def _hermes(calls):
    return "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>\n'
                   for n, a in calls)


# (reasoning parser, prompt tail, template kwargs, tool parser, output) -> (reasoning, content, calls)
CASES = {
    "r1 reasoning, template opened <think>": (
        ("deepseek_r1", "<｜Assistant｜><think>\n", {}, None,
         "Paris is in France.\nSo: Paris.\n</think>\n\nThe capital is **Paris**."),
        ("Paris is in France.\nSo: Paris.\n", "The capital is **Paris**.", [])),
    "r1 reasoning, model opens <think>": (
        ("deepseek_r1", "<｜Assistant｜>", {}, None, "<think>hmm <b>x</b></think>Answer: 4 < 5"),
        ("hmm <b>x</b>", "Answer: 4 < 5", [])),
    "r1 cut off while thinking": (
        ("deepseek_r1", "", {}, None, "still thinking </thin"), ("still thinking </thin", "", [])),
    "r1 reasoning then deepseek tool calls": (
        ("deepseek_r1", "<think>\n", {}, "deepseek_v3",
         "I need the weather.</think>Let me look." + _ds([("get_weather", WEATHER), ("get_time", TIME)])),
        ("I need the weather.", "Let me look.", [("get_weather", WEATHER), ("get_time", TIME)])),
    "qwen3 thinking": (
        ("qwen3", "<|im_start|>assistant\n", {}, "hermes",
         "<think>\nThe user wants weather.\n</think>\n\n" + _hermes([("get_weather", WEATHER)])),
        ("\nThe user wants weather.\n", "", [("get_weather", WEATHER)])),
    "qwen3 without <think> is all content": (
        ("qwen3", "<|im_start|>assistant\n", {}, None, "Plain <thinking> answer </think> here"),
        ("", "Plain <thinking> answer </think> here", [])),
    "qwen3 enable_thinking false": (
        ("qwen3", "<think>\n\n</think>\n\n", {"enable_thinking": False}, "hermes",
         "Sure. " + _hermes([("get_time", TIME), ("get_weather", WEATHER)])),
        (None, "Sure. ", [("get_time", TIME), ("get_weather", WEATHER)])),
    "kimi k2 thinking, tool section ends the reasoning": (
        ("kimi_k2", "<|im_assistant|>assistant<|im_middle|>", {}, "kimi_k2",
         "<think>Weather first" + _kimi([("get_weather", WEATHER), ("get_time", TIME)])),
        ("Weather first", "", [("get_weather", WEATHER), ("get_time", TIME)])),
    "kimi k2 thinking off": (
        ("kimi_k2", "", {"thinking": False}, "kimi_k2", "Hi! " + _kimi([("get_time", TIME)])),
        (None, "Hi! ", [("get_time", TIME)])),
    "hermes, no calls, text that looks like a marker": (
        (None, "", {}, "hermes", "Use <tool> or <tool_c tags"), (None, "Use <tool> or <tool_c tags", [])),
    "hermes, a marker that opens no call: the text is all content": (
        (None, "", {}, "hermes", "Write `<tool_call>` then the word banana."),
        (None, "Write `<tool_call>` then the word banana.", [])),
    "deepseek, a section with no call in it: all content": (
        (None, "", {}, "deepseek_v3", "Tools: <｜tool▁calls▁begin｜> none today."),
        (None, "Tools: <｜tool▁calls▁begin｜> none today.", [])),
    "hermes, arguments before name": (
        (None, "", {}, "hermes", '<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>'),
        (None, "", [("get_time", {"tz": "UTC"})])),
    "hermes, cut off inside the closing tag": (
        (None, "", {}, "hermes", '<tool_call>\n{"name": "get_time", "arguments": {\n"tz": "UTC"\n}}\n</tool_call'),
        (None, "", [("get_time", {"tz": "UTC"})])),
    "hermes, cut off right after the arguments": (
        (None, "", {}, "hermes", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}'),
        (None, "", [("get_time", {"tz": "UTC"})])),
    "hermes, cut off after the wrapper's brace": (
        (None, "", {}, "hermes", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n<'),
        (None, "", [("get_time", {"tz": "UTC"})])),
    "deepseek, cut off inside the call's end": (
        (None, "", {}, "deepseek_v3", "<｜tool▁calls▁begin｜>" + DS_CALL.format(
            name="get_time", args=json.dumps(TIME))[:-len("<｜tool▁call▁end｜>") - 2]),
        (None, "", [("get_time", TIME)])),
    "kimi, cut off inside the call's end": (
        (None, "", {}, "kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
                                  "<|tool_call_argument_begin|>" + json.dumps(TIME) + "<|tool_call_e"),
        (None, "", [("get_time", TIME)])),
    "deepseek v3.1 call format": (
        (None, "", {}, "deepseek_v3",
         ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz": "UTC"}<｜tool▁call▁end｜>'
          '<｜tool▁calls▁end｜>')),
        (None, "", [("get_time", {"tz": "UTC"})])),
}


def _output(reasoning, tail, kwargs, tools):
    parser = reasoning and reasoning_parser(reasoning, tail, kwargs)
    return ChatOutput(parser, tools and tool_call_format(tools))


def _streamed(setup, pieces):
    """Reasoning, content and calls from the stream's deltas, checking OpenAI's delta shape."""
    out = _output(*setup[:4])
    reasoning, content, calls = "", "", []
    for i, piece in enumerate(pieces):
        for d in out.feed(piece, 1, final=i == len(pieces) - 1):
            assert len(d) == 1
            reasoning += d.get("reasoning_content", "")
            content += d.get("content", "")
            for tc in d.get("tool_calls", []):
                if "id" in tc:  # a new call: id, type and name first, then argument fragments
                    assert tc["index"] == len(calls) and tc["function"]["arguments"] == ""
                    calls.append([tc["id"], tc["function"]["name"], ""])
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    calls[tc["index"]][2] += tc["function"]["arguments"]
    return reasoning, content, calls, out


@pytest.mark.parametrize("case", CASES)
def test_whole_answer(case: str) -> None:
    setup, (want_reasoning, want_content, want_calls) = CASES[case]
    out = _output(*setup[:4])
    msg = out.message(setup[4], 7)
    assert msg.get("reasoning_content", None) == (want_reasoning or None)
    assert (msg["content"] or "") == want_content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]
    assert got == want_calls
    ids = [c["id"] for c in msg.get("tool_calls", [])]
    assert len(set(ids)) == len(ids)
    for cid in ids:
        assert cid.startswith("functions.") if setup[3] == "kimi_k2" else cid.startswith("call_")
    assert out.finish_reason("stop") == ("tool_calls" if want_calls else "stop")
    assert out.finish_reason("length") == "length"


@pytest.mark.parametrize("case", CASES)
def test_stream_split_anywhere_matches_whole(case: str) -> None:
    setup = CASES[case][0]
    text = setup[4]
    whole = _output(*setup[:4]).message(text, 1)
    want = (whole.get("reasoning_content") or "", whole["content"] or "",
            [(c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])])
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        reasoning, content, calls, out = _streamed(setup, pieces)
        got = (reasoning, content if want[2] == [] or content.strip() else "",
               [(name, args) for _, name, args in calls])
        assert got == want, pieces
        assert out.called == bool(want[2])


def test_reasoning_tokens_count_the_thinking_part() -> None:
    out = ChatOutput(reasoning_parser("deepseek_r1", "<think>", {}), None)
    tokens = ["Let", " me", " think", "</think>", "\n\n", "Paris", "."]
    for t in tokens:
        out.feed(t, 1)
    out.feed("", 0, final=True)
    assert out.reasoning_tokens == 4  # up to and including </think>
    plain = ChatOutput(reasoning_parser("qwen3", "", {}), None)
    for t in ["Paris", " is", " it"]:
        plain.feed(t, 1)
    assert plain.reasoning_tokens == 0


def test_a_template_that_closed_the_reasoning_turns_the_parser_off() -> None:
    # DeepSeek-V3.1 without thinking, Qwen3 with enable_thinking false: the prompt ends in </think>
    assert reasoning_parser("deepseek_r1", "<｜Assistant｜></think>", {}) is None
    assert reasoning_parser("qwen3", "<think>\n\n</think>\n\n", {}) is None
    assert reasoning_parser("deepseek_r1", "<｜Assistant｜><think>\n", {}).forced


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    out = ChatOutput(None, tool_call_format("hermes"), parallel=False)
    msg = out.message(_hermes([("get_time", TIME), ("get_weather", WEATHER)]), 30)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_time"]


def test_parsers_chosen_from_the_model() -> None:
    assert default_parsers("deepseek_v3", "{{'<think>'}}") == ("deepseek_r1", "deepseek_v3")
    assert default_parsers("deepseek_v3", "{{ x }}") == (None, "deepseek_v3")
    assert default_parsers("kimi_k2", "<think>") == ("kimi_k2", "kimi_k2")
    assert default_parsers("qwen3_moe", "") == ("qwen3", "hermes")
    assert default_parsers("llama", "") == (None, "hermes")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("o1", "", {})
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_call_format("mistral")


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1} or so}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1} or so}\n</tool_ca',
    '<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, "}"]}}}\n</tool_call>'])
def test_arguments_streamed_add_up_to_the_whole_even_when_malformed(text: str) -> None:
    setup = (None, "", {}, "hermes", text)
    (whole,) = _output(*setup[:4]).message(text, 1)["tool_calls"]
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        _, _, calls, _ = _streamed(setup, pieces)
        assert [(n, a) for _, n, a in calls] == [("f", whole["function"]["arguments"])], pieces


@pytest.mark.parametrize("text, reason", [
    ('<tool_call>\n{"name": "f", "arguments": {"city": "', "stop"),   # a stop string ("Paris") cut it
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1} or so}\n</tool_call>', "stop"),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "tool_calls")])
def test_tool_calls_is_the_finish_reason_only_for_whole_calls(text: str, reason: str) -> None:
    out = ChatOutput(None, tool_call_format("hermes"))
    assert out.message(text, 9)["tool_calls"]
    assert out.finish_reason("stop") == reason
