"""Reasoning parsers: a reasoning model's output split into `reasoning_content` and `content`.

Formats follow vLLM's parsers of the same names: DeepSeek-R1 (`<think>`...`</think>`, the template
may open `<think>` itself), Qwen3 (thinks only when the output or the prompt opens `<think>`) and
Kimi-K2 Thinking (R1's tags; a tool-call section also ends the reasoning). A parser works on the
whole text generated so far and never takes back what it returned, so streams are exact under any
split of the text (see `split`).
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
KIMI_TOOL_SECTION = "<|tool_calls_section_begin|>"
REASONING_PARSERS = ("deepseek_r1", "qwen3", "kimi_k2")


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that may still grow into one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


@dataclass(frozen=True)
class ReasoningParser:
    """`forced`: the output starts inside the reasoning (R1, or a prompt ending in an open `<think>`);
    otherwise it reasons only if the output opens with `<think>`. `ends`: the markers that end the
    reasoning; the first is dropped, the others (a tool-call section) stay in the content."""
    name: str
    forced: bool
    ends: tuple[str, ...] = (THINK_END,)

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of `text`. With `final` False the text may still grow, and what may
        be the start of a marker is held back, so each later call's parts extend this call's."""
        body = text.lstrip()
        if body.startswith(THINK_START):
            body = body[len(THINK_START):]
        elif not final and THINK_START.startswith(body):
            return "", ""  # may still become `<think>`
        elif not self.forced:
            return "", text
        else:
            body = text
        cut, marker = min(((body.find(m), m) for m in self.ends if m in body), default=(-1, ""))
        if cut < 0:
            return body[:len(body) - (0 if final else held_back(body, self.ends))], ""
        rest = body[cut + len(marker):] if marker == self.ends[0] else body[cut:]
        return body[:cut], rest.lstrip()


def reasoning_parser(name: str, prompt_tail: str, template_kwargs: dict) -> ReasoningParser | None:
    """The parser `name` for one request. `prompt_tail`: the rendered prompt's last characters (a
    template that opened `<think>` forces reasoning); `template_kwargs`: the request's
    chat_template_kwargs, whose thinking switches (`enable_thinking`, `thinking`) turn it off, as
    does a template that closed the reasoning itself (DeepSeek-V3.1's non-thinking mode)."""
    opened = prompt_tail.rstrip().endswith(THINK_START)
    if prompt_tail.rstrip().endswith(THINK_END) and name in REASONING_PARSERS:
        return None
    if name == "deepseek_r1":
        return ReasoningParser(name, forced=True)
    if name == "qwen3":
        if template_kwargs.get("enable_thinking") is False:
            return None
        return ReasoningParser(name, forced=opened)
    if name == "kimi_k2":
        if template_kwargs.get("thinking") is False:
            return None
        return ReasoningParser(name, forced=True, ends=(THINK_END, KIMI_TOOL_SECTION))
    raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
