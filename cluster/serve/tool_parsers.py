"""Tool-call parsers: a model's output text split into `content` and OpenAI `tool_calls`.

Formats follow vLLM's parsers of the same names:
- hermes (Qwen2.5/Qwen3, and the fallback prompt of templates without tools):
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call;
- deepseek_v3 (DeepSeek-V3/R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{...}
  \\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>` (V3.1's `<｜tool▁call▁begin｜>f<｜tool▁sep｜>{...}` too);
- kimi_k2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{...}
  <|tool_call_end|><|tool_calls_section_end|>` (the call's id is the model's `functions.f:0`).
Text before the first call is the content; the arguments are the model's JSON text as written. A
parser works on the whole text so far and never takes back what it returned (held back: what may
still become a marker), so streamed deltas add up to the final answer under any split.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .reasoning_parsers import held_back

TOOL_PARSERS = ("hermes", "deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text; while streaming, the part known so far
    call_id: str | None = None  # the model's own id (Kimi-K2), else None: the server names it


class ToolCallFormat:
    """One model family's tool-call markup: a section opens at `section_begin`, each call runs from
    `call_begin` to `call_end`; `header` finds the name (and where the arguments start) in a call's
    text, `arguments` trims the arguments' text, `whole` reads a complete call another way."""
    name = ""
    xgrammar_model = ""  # xgrammar's builtin structural tag of this format (constrained tool calls)
    section_begin = call_begin = call_end = ""
    trailing = " \t\r\n"  # characters that may close the arguments rather than belong to them

    def header(self, body: str, done: bool) -> tuple[str, str | None, int] | None:
        raise NotImplementedError

    def arguments(self, raw: str, done: bool) -> str:
        if not done:
            return raw.lstrip().rstrip(self.trailing)
        raw = raw.strip()
        value = _leading_json(raw)
        # a JSON value followed only by what may close it (the rest of the markup, cut off or not);
        # streamed, the arguments never held more than the value, so this only adds to them
        if value is not None and not raw[len(value):].strip(self.trailing):
            return value
        return self.unparsed(raw)

    def unparsed(self, raw: str) -> str:
        """The arguments of a finished call whose text does not start with a JSON value."""
        return raw

    def whole(self, body: str) -> ParsedCall | None:
        return None

    def parse(self, text: str, final: bool = True) -> tuple[str, list[ParsedCall]]:
        """(content, calls) of `text`; with `final` False the text may still grow."""
        start = text.find(self.section_begin)
        if start < 0:
            return text[:len(text) - (0 if final else held_back(text, (self.section_begin,)))], []
        calls: list[ParsedCall] = []
        pos = start
        while (begin := text.find(self.call_begin, pos)) >= 0:
            begin += len(self.call_begin)
            end = text.find(self.call_end, begin)
            body = text[begin:] if end < 0 else text[begin:end]
            if end < 0:   # an unclosed call's end may be the start of its closing marker (cut off)
                body = body[:len(body) - held_back(body, (self.call_end,))]
            done = end >= 0 or final
            head = self.header(body, done)
            if head is not None:
                name, call_id, offset = head
                calls.append(ParsedCall(name, self.arguments(body[offset:], done), call_id))
            elif done and (call := self.whole(body)) is not None:
                calls.append(call)
            if end < 0:
                break
            pos = end + len(self.call_end)
        if final and not calls:   # markup that holds no call: the text is the answer (as vLLM's)
            return text, []
        return text[:start], calls


class Hermes(ToolCallFormat):
    name = "hermes"
    xgrammar_model = "qwen_3"
    section_begin = call_begin = "<tool_call>"
    call_end = "</tool_call>"
    trailing = " \t\r\n}"
    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')

    def header(self, body: str, done: bool) -> tuple[str, str | None, int] | None:
        m = self._HEAD.match(body)
        return None if m is None else (json.loads(m.group(1)), None, m.end())

    def unparsed(self, raw: str) -> str:
        return raw[:-1].rstrip() if raw.endswith("}") else raw  # less the object around name and arguments

    def whole(self, body: str) -> ParsedCall | None:
        # Any other key order: a complete call only (nothing of it was streamed before).
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                and isinstance(obj.get("arguments", {}), dict)):
            return None
        return ParsedCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


class DeepSeekV3(ToolCallFormat):
    name = "deepseek_v3"
    xgrammar_model = "deepseek_r1"  # R1 and V3 write calls the same way
    section_begin = "<｜tool▁calls▁begin｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    fence = "```json"
    trailing = " \t\r\n`"

    def header(self, body: str, done: bool) -> tuple[str, str | None, int] | None:
        kind, found, rest = body.partition(self.sep)
        if not found:
            return None
        offset = len(kind) + len(self.sep)
        if kind.strip() != "function":  # V3.1: the name before the separator
            return kind.strip(), None, offset
        name, newline, _ = rest.partition("\n")
        if not newline:
            return (name.strip(), None, len(body)) if done and name.strip() else None
        offset += len(name) + 1
        after = body[offset:].lstrip()
        if after.startswith(self.fence):
            return name.strip(), None, len(body) - len(after) + len(self.fence)
        if not done and self.fence.startswith(after):
            return None  # the fence may still be coming
        return name.strip(), None, offset

    def unparsed(self, raw: str) -> str:
        return raw.removesuffix("```").rstrip()


class KimiK2(ToolCallFormat):
    name = "kimi_k2"
    xgrammar_model = "kimi"
    section_begin = "<|tool_calls_section_begin|>"
    call_begin, call_end = "<|tool_call_begin|>", "<|tool_call_end|>"
    args_begin = "<|tool_call_argument_begin|>"

    def header(self, body: str, done: bool) -> tuple[str, str | None, int] | None:
        head, found, _ = body.partition(self.args_begin)
        if not found:
            return None
        call_id = head.strip()
        name = call_id.rsplit(":", 1)[0]
        name = name.split(".", 1)[1] if name.startswith("functions.") else name
        return name, call_id, len(head) + len(self.args_begin)


def _leading_json(text: str) -> str | None:
    """The JSON value `text` starts with, as written; None if it does not start with one."""
    try:
        return text[:json.JSONDecoder().raw_decode(text)[1]]
    except ValueError:
        return None


_FORMATS: dict[str, type[ToolCallFormat]] = {f.name: f for f in (Hermes, DeepSeekV3, KimiK2)}


def tool_call_format(name: str) -> ToolCallFormat:
    try:
        return _FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None
