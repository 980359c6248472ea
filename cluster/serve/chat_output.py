"""One chat answer's text as OpenAI returns it: `reasoning_content`, `content` and `tool_calls`.

`ChatOutput` takes the generated text delta by delta and gives the stream's deltas (each a chunk's
`delta`), or, for a whole answer, the message; the reasoning parser runs first and the tool-call
parser on the content after it. `default_parsers` picks both from the model's architecture.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from .reasoning_parsers import THINK_START, ReasoningParser
from .tool_parsers import ToolCallFormat

log = logging.getLogger(__name__)


def model_type(path: Path) -> str:
    """The checkpoint's architecture (`model_type` of config.json, or GGUF's general.architecture)."""
    if path.is_dir():
        return str(json.loads((path / "config.json").read_text()).get("model_type", ""))
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    return str(field.contents()) if field is not None else ""


def default_parsers(arch: str, chat_template: str) -> tuple[str | None, str]:
    """(reasoning parser or None, tool-call parser) for a model, as one would pass them to vLLM:
    DeepSeek-V3 and Kimi-K2 checkpoints reason when their template knows `<think>` (R1, K2 Thinking),
    Qwen3 always may; every other model writes hermes tool calls (the fallback prompt asks for them)."""
    thinks = "<think>" in (chat_template or "")
    if arch == "deepseek_v3":
        return ("deepseek_r1" if thinks else None), "deepseek_v3"
    if arch == "kimi_k2":
        return ("kimi_k2" if thinks else None), "kimi_k2"
    if arch in ("qwen3", "qwen3_moe"):
        return "qwen3", "hermes"
    return None, "hermes"


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatOutput:
    """The parsed view of one choice's text. `tools` None: no tool parsing (no tools, or
    tool_choice "none"); `parallel` False keeps the first call only."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallFormat | None,
                 parallel: bool = True) -> None:
        self.reasoning, self.tools, self.parallel = reasoning, tools, parallel
        self.text = ""
        self.reasoning_tokens = 0
        self._reasoning = self._content = ""   # what was returned so far
        self._calls: list[list[str]] = []      # [id, name, arguments returned so far]

    def _thinking(self, before: str) -> bool:
        """Whether text added after `before` belongs to the reasoning (its end marker does)."""
        r = self.reasoning
        if r is None or any(m in before for m in r.ends):
            return False
        body = self.text.lstrip()
        return r.forced or body.startswith(THINK_START) or THINK_START.startswith(body)

    def feed(self, text: str, num_tokens: int = 0, final: bool = False) -> list[dict[str, Any]]:
        """Add generated text (`num_tokens` tokens); the deltas that are now certain, in order."""
        before, self.text = self.text, self.text + text
        if num_tokens and self._thinking(before):
            self.reasoning_tokens += num_tokens
        reasoning, content = (self.reasoning.split(self.text, final) if self.reasoning
                              else ("", self.text))
        calls = []
        if self.tools is not None:
            content, calls = self.tools.parse(content, final)
            calls = calls if self.parallel else calls[:1]
        deltas: list[dict[str, Any]] = []
        if reasoning != self._reasoning and self._extends(reasoning, self._reasoning, "reasoning"):
            deltas.append({"reasoning_content": reasoning[len(self._reasoning):]})
            self._reasoning = reasoning
        if content != self._content and self._extends(content, self._content, "content"):
            deltas.append({"content": content[len(self._content):]})
            self._content = content
        for i, call in enumerate(calls):
            if i == len(self._calls):
                self._calls.append([call.call_id or new_call_id(), call.name, ""])
                deltas.append({"tool_calls": [{"index": i, "id": self._calls[i][0], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            sent = self._calls[i][2]
            if call.arguments != sent and self._extends(call.arguments, sent, "arguments"):
                deltas.append({"tool_calls": [{"index": i, "function": {
                    "arguments": call.arguments[len(sent):]}}]})
                self._calls[i][2] = call.arguments
        return deltas

    @staticmethod
    def _extends(new: str, old: str, what: str) -> bool:
        if new.startswith(old):
            return True
        log.warning("a parser took back %s it had returned (%r after %r); keeping the old", what, new, old)
        return False

    @property
    def called(self) -> bool:
        return bool(self._calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" for an answer that ended by itself after calling a function, each
        call's arguments a whole JSON object (a stop string can cut one short)."""
        return "tool_calls" if reason == "stop" and self._calls and all(
            _json_object(args) for _, _, args in self._calls) else reason

    def message(self, text: str, num_tokens: int) -> dict[str, Any]:
        """The whole answer as a chat message (call it once, instead of `feed`)."""
        self.feed(text, num_tokens, final=True)
        empty = not self._content.strip() and (self._calls or self._reasoning)
        msg: dict[str, Any] = {"role": "assistant", "content": None if empty else self._content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self._reasoning or None
        if self._calls:
            msg["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                                 for cid, name, args in self._calls]
        return msg
