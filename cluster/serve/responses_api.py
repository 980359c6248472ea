"""OpenAI's Responses API (`POST /v1/responses`) over the chat path.

A request's `instructions` and `input` items become chat messages, its function tools and
`text.format` chat's `tools` and `response_format`, and the chat request is validated and run like
any other (`ChatCompletionRequest`); a refusal names the Responses API's field, not chat's. The chat
answer's deltas (`ChatOutput`) become the response's output items (reasoning, message,
function_call) and, when streamed, the Responses API's typed events.

Nothing is stored: `store: true`, `previous_response_id`, `conversation` and `background` are
refused, so a client sends the whole conversation each turn, as with `store: false`.
"""
from __future__ import annotations

import copy
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response

from ...engine.outputs import TokenLogprob
from . import openai_protocol as oai
from .chat_output import ChatOutput
from .orchestrator import Delta, RequestRecord
from .responses import error_response

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# asked for by stateless clients (Codex): reasoning items carry `encrypted_content`, null here (their
# reasoning text comes back whole in `content`, and a client returns the item as it got it)
ENCRYPTED_REASONING_INCLUDE = "reasoning.encrypted_content"
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
# the Responses API's fields that mean what chat's fields of the same name mean
PASSED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos", "user",
          "parallel_tool_calls", "chat_template_kwargs", "stream", "top_logprobs")
NOT_STORED = "this server stores no responses: send the whole conversation in input"
# field -> (why it is refused, the values that ask for nothing)
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "store": (NOT_STORED + " (store: false)", (False,)),
    "previous_response_id": (NOT_STORED, ()),
    "conversation": (NOT_STORED, ()),
    "background": ("background responses are not supported", (False,)),
    "prompt": ("reusable prompts are not supported: send instructions and input", ()),
    "truncation": ("a conversation longer than the context is a 400, never truncated", ("disabled",)),
    "service_tier": ("there is one service tier", ("auto", "default")),
}
# the values of the refused fields that the API defines (others are invalid, not unsupported);
# an absent entry: any value of the off values' type
_DEFINED: dict[str, tuple[Any, ...]] = {
    "truncation": ("auto", "disabled"), "service_tier": ("auto", "default", "flex", "scale", "priority")}
# chat's and completions' fields, which the Responses API names otherwise or has not
CHAT_FIELDS = {
    "messages": "use input", "max_tokens": "use max_output_tokens",
    "max_completion_tokens": "use max_output_tokens", "response_format": "use text.format",
    "logprobs": f"use include: [{LOGPROBS_INCLUDE!r}]", "n": "a response has one output",
    "suffix": "", "echo": "", "best_of": "a response has one output"}
# chat's names for what the Responses API calls otherwise (a refusal's `param`)
_RENAMED = ((re.compile(r"^max_completion_tokens"), "max_output_tokens"),
            (re.compile(r"^response_format\.json_schema"), "text.format"),
            (re.compile(r"^response_format"), "text.format"),
            (re.compile(r"^tools\.(\d+)\.function"), r"tools.\1"),
            (re.compile(r"^tool_choice\.function"), "tool_choice"))
_MESSAGE_PARAM = re.compile(r"^messages(?:\.(\d+)(\..*)?)?$")


def _invalid(message: str, param: str, code: str = "invalid_value") -> oai.OpenAIError:
    return oai.OpenAIError(400, message, param=param, code=code)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Sources:
    """Where each chat message came from: "instructions", "input" or "input.<i>", and whether that
    item was a message, whose content and role are where chat's are (`messages`); and each tool
    call's function_call item, by "messages.<k>.tool_calls.<j>" (`calls`)."""
    messages: list[tuple[str, bool]] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)


@dataclass
class ResponsesRequest:
    """A Responses API body as a chat request (`chat`, validated), with what the response echoes
    (`echo`) and where its chat messages came from (`sources`)."""
    chat: oai.ChatCompletionRequest
    echo: dict[str, Any]
    sources: Sources = field(default_factory=Sources)

    @property
    def logprobs(self) -> bool:
        return bool(self.chat.logprobs)

    def error(self, exc: oai.OpenAIError) -> oai.OpenAIError:
        return api_error(exc, self.sources)


# a tool call's fields in chat -> in its function_call item
_CALL_FIELDS = ((".function.arguments", ".arguments"), (".function.name", ".name"), (".id", ".call_id"))


def api_error(exc: oai.OpenAIError, sources: Sources) -> oai.OpenAIError:
    """A chat refusal with its `param` (and the message's mention of it) in the Responses API's
    names."""
    param = exc.param
    if not param:
        return exc
    renamed = param
    m = _MESSAGE_PARAM.match(param)
    call = next((key for key in sources.calls if param == key or param.startswith(key + ".")), None)
    if call is not None:
        rest = param[len(call):]
        renamed = sources.calls[call] + next((new for old, new in _CALL_FIELDS if rest == old), "")
    elif m:
        k = m.group(1)
        if k is None or not sources.messages:
            renamed = "input"
        else:
            where, message_item = sources.messages[min(int(k), len(sources.messages) - 1)]
            rest = m.group(2) or ""   # a message item's content and role are where chat's are
            renamed = where + (rest if message_item and rest.startswith((".content", ".role")) else "")
    else:
        for pattern, name in _RENAMED:
            renamed = pattern.sub(name, renamed, count=1)
    if renamed == param:
        return exc
    return oai.OpenAIError(exc.status, exc.message.replace(param, renamed, 1), param=renamed,
                           code=exc.code, retry_after_s=exc.retry_after_s)


def parse(data: dict[str, Any]) -> ResponsesRequest:
    """Validate a decoded Responses API body; any problem is an OpenAIError naming its field."""
    for name, (why, nothing) in REFUSED.items():
        value = data.get(name)
        if value is None or any(value == v and type(value) is type(v) for v in nothing):
            continue
        defined = _DEFINED.get(name)
        if (value not in defined) if defined else (nothing and type(value) is not type(nothing[0])):
            raise _invalid(f"{name}: {value!r} is not a valid value", name)
        raise _invalid(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")
    for name, instead in CHAT_FIELDS.items():
        if data.get(name) is not None:
            raise _invalid(f"'{name}' is not a Responses API field" + (f": {instead}" if instead else ""),
                           name, "unknown_parameter")
    messages, sources = _messages(data)
    body: dict[str, Any] = {k: data[k] for k in PASSED if k in data}
    # chat's refused fields stay refused here (other servers' samplers, guided decoding, ...)
    body.update({k: data[k] for k in oai.ChatCompletionRequest.REFUSED if k in data})
    body["messages"] = messages
    if data.get("max_output_tokens") is not None:
        body["max_completion_tokens"] = data["max_output_tokens"]
    tools = _tools(data.get("tools"))
    if tools is not None:
        body["tools"] = tools
    # "auto" is the Responses API's default, sent by clients with no tools too (chat refuses that)
    if data.get("tool_choice") is not None and not (data["tool_choice"] == "auto" and not tools):
        body["tool_choice"] = _tool_choice(data["tool_choice"])
    text_format = _text_format(data.get("text"))
    if text_format is not None:
        body["response_format"] = text_format
    _check_reasoning(data.get("reasoning"))
    logprobs = _include(data.get("include"))
    top = data.get("top_logprobs")
    if isinstance(top, int) and not isinstance(top, bool) and top > 0 and not logprobs:
        raise _invalid(f"top_logprobs needs include: [{LOGPROBS_INCLUDE!r}]", "top_logprobs")
    if logprobs:
        body["logprobs"] = True
    _check_options(data)
    try:
        chat = oai.validate(oai.ChatCompletionRequest, body)
    except oai.OpenAIError as exc:
        raise api_error(exc, sources) from None
    echo = {k: data.get(k) for k in ("instructions", "max_output_tokens", "max_tool_calls", "user",
                                     "prompt_cache_key", "safety_identifier", "top_logprobs")}
    echo.update(metadata=data.get("metadata") or {}, tools=data.get("tools") or [],
                tool_choice=data.get("tool_choice") or "auto",
                parallel_tool_calls=data.get("parallel_tool_calls", True) is not False,
                temperature=1.0 if chat.temperature is None else chat.temperature,
                top_p=1.0 if chat.top_p is None else chat.top_p,
                text={"format": (data.get("text") or {}).get("format") or {"type": "text"},
                      "verbosity": "medium"})
    return ResponsesRequest(chat, echo, sources)


def _messages(data: dict[str, Any]) -> tuple[list[dict[str, Any]], Sources]:
    messages: list[dict[str, Any]] = []
    sources = Sources()
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("instructions must be a string", "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
            sources.messages.append(("instructions", False))
    items = data.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        sources.messages.append(("input", False))
        return messages, sources
    if not isinstance(items, list) or not items:
        raise _invalid("input must be a string or a non-empty list of items", "input",
                       "missing" if items is None else "invalid_value")
    calls: set[str] = set()
    thinking: list[str] = []   # reasoning items' text, for the assistant turn they precede
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind is None:
            raise _invalid(f"{where} needs a type (or a role, for a message)", f"{where}.type", "missing")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise _invalid(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
            message = {"role": role, "content": _content(item.get("content"), f"{where}.content")}
            if role == "assistant":
                _with_thinking(message, thinking)
            thinking = []
            messages.append(message)
            sources.messages.append((where, True))
        elif kind == "function_call":
            call_id, name, arguments = (_string(item, k, where) for k in ("call_id", "name", "arguments"))
            if call_id in calls:
                raise _invalid(f"{where}.call_id {call_id!r} is an earlier function_call's too",
                               f"{where}.call_id")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not thinking:
                last.setdefault("tool_calls", []).append(call)   # one assistant turn: text, then calls
            else:
                messages.append(_with_thinking({"role": "assistant", "content": None, "tool_calls": [call]},
                                               thinking))
                thinking = []
                sources.messages.append((where, False))
            k, j = len(messages) - 1, len(messages[-1]["tool_calls"]) - 1
            sources.calls[f"messages.{k}.tool_calls.{j}"] = where
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            if call_id not in calls:
                raise _invalid(f"{where}.call_id {call_id!r} answers no earlier function_call item",
                               f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _parts_text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            sources.messages.append((where, False))
            thinking = []
        elif kind == "reasoning":
            # the model's earlier thinking goes back with the assistant turn it led to, for the
            # templates that keep it (Qwen3's, within a tool loop); the others leave it out
            text = _reasoning_text(item, where)
            if text:
                thinking.append(text)
        else:
            raise _invalid(f"{where}: input items of type {kind!r} are not supported (message, "
                           "function_call, function_call_output and reasoning are)", f"{where}.type",
                           "unsupported_parameter")
    return messages, sources


def _with_thinking(message: dict[str, Any], thinking: list[str]) -> dict[str, Any]:
    """An assistant message with the reasoning items' text that led to it, if any."""
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    return message


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item's text: its content (reasoning_text parts), else its summary's."""
    if item.get("encrypted_content") is not None:   # another server's: unreadable here
        raise _invalid(f"{where}: a reasoning item's encrypted_content cannot be read by this server "
                       "(send its text in content, or leave the item out)", f"{where}.encrypted_content",
                       "unsupported_parameter")
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list):
            raise _invalid(f"{where}.{key} must be a list", f"{where}.{key}")
        texts = []
        for j, part in enumerate(parts):
            if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
                raise _invalid(f"{where}.{key}.{j} must be an object with a text", f"{where}.{key}.{j}")
            texts.append(part["text"])
        if texts:
            return "\n".join(texts)
    return ""


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _invalid(f"{where}.{key} must be a string", f"{where}.{key}",
                       "missing" if value is None else "invalid_value")
    return value


def _text_of_part(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise _invalid(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    if kind not in TEXT_PARTS:
        raise _invalid(f"{where}: content of type {kind!r} is not supported: this server takes text "
                       f"({', '.join(TEXT_PARTS)})", f"{where}.type", "unsupported_parameter")
    return _string(part, "text", where)


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message item's content as chat's: its text, or its text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _invalid(f"{where} must be a string or a non-empty list of content parts", where)
    return [{"type": "text", "text": _text_of_part(p, f"{where}.{j}")} for j, p in enumerate(content)]


def _parts_text(parts: Any, where: str) -> str:
    if not isinstance(parts, list) or not parts:
        raise _invalid(f"{where} must be a string or a non-empty list of text parts", where)
    return "\n".join(_text_of_part(p, f"{where}.{j}") for j, p in enumerate(parts))


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _invalid("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid(f"tools.{i} must be an object", f"tools.{i}")
        if tool.get("type") != "function":
            raise _invalid(f"tools.{i}: tools of type {tool.get('type')!r} are not supported: this "
                           "server runs no built-in tools (declare a function)", f"tools.{i}.type",
                           "unsupported_parameter")
        out.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _invalid(f"tool_choice of type {choice.get('type')!r} is not supported (none, auto, "
                           "required or a function)", "tool_choice.type", "unsupported_parameter")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice   # "none", "auto", "required"; anything else chat's validation refuses


def _text_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's response_format (None: plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("text must be an object", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise _invalid("'text.verbosity' is not supported by this server: answers are as long as the "
                       "model makes them", "text.verbosity", "unsupported_parameter")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _invalid("text.format.type must be text, json_object or json_schema", "text.format.type")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if fmt.get("schema") is None:   # required here (chat's json_schema may leave it out)
        raise _invalid("text.format of type json_schema needs a schema", "text.format.schema", "missing")
    return {"type": "json_schema", "json_schema": {
        k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}}


def _check_reasoning(reasoning: Any) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise _invalid("reasoning must be an object", "reasoning")
    if reasoning.get("effort") is not None:
        raise _invalid("'reasoning.effort' is not supported by this server: a reasoning model's "
                       "thinking is switched with chat_template_kwargs", "reasoning.effort",
                       "unsupported_parameter")
    for key in ("summary", "generate_summary"):   # "auto": a summary if the server makes one
        if reasoning.get(key) not in (None, "auto"):
            raise _invalid(f"'reasoning.{key}' is not supported by this server: the reasoning comes "
                           "whole, as a reasoning item's content", f"reasoning.{key}",
                           "unsupported_parameter")


def _include(include: Any) -> bool:
    """Whether `include` asks for the output text's logprobs (the only inclusion there is here)."""
    if include is None:
        return False
    if not isinstance(include, list):
        raise _invalid("include must be a list of strings", "include")
    for j, value in enumerate(include):
        if value not in (LOGPROBS_INCLUDE, ENCRYPTED_REASONING_INCLUDE):
            raise _invalid(f"include {value!r} is not supported (only {LOGPROBS_INCLUDE!r} and "
                           f"{ENCRYPTED_REASONING_INCLUDE!r})", f"include.{j}", "unsupported_parameter")
    return LOGPROBS_INCLUDE in include


def _check_options(data: dict[str, Any]) -> None:
    metadata = data.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items())):
        raise _invalid("metadata must be an object of at most 16 string values (keys up to 64 "
                       "characters, values up to 512)", "metadata")
    for name in ("prompt_cache_key", "safety_identifier"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _invalid(f"{name} must be a string", name)
    calls = data.get("max_tool_calls")   # built-in tools' calls: there are none here
    if calls is not None and (not isinstance(calls, int) or isinstance(calls, bool) or calls < 1):
        raise _invalid("max_tool_calls must be a positive integer", "max_tool_calls")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options must be an object", "stream_options")


def usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's usage in the Responses API's names."""
    details = chat_usage.get("completion_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens") or 0},
            "total_tokens": chat_usage["total_tokens"]}


def _text_logprobs(deltas: list[dict[str, Any]], pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of a step's logprobs (with those still waiting for their text), the ones of its output
    text's tokens: none where the step's text is all reasoning or tool calls; where it is both, the
    last ones, as many as the text's bytes take (the reasoning and its end marker come first)."""
    if not deltas:
        return pending                     # the text is held back: they wait for it
    text = "".join(d.get("content") or "" for d in deltas)
    if not text:
        return []
    if all(set(d) == {"content"} for d in deltas):
        return pending
    size, keep = len(text.encode()), 0
    for entry in reversed(pending):
        size -= len(entry["bytes"])
        if size < 0:
            break
        keep += 1
    return pending[len(pending) - keep:]


class OutputItems:
    """One response's output items, built from its chat answer's deltas in the order they come: a
    reasoning item, a message (its text as one output_text part) and function_call items. `feed`
    and `close` return the stream events that say so, numbered in order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._space = ""                 # leading whitespace held until a message has more to say
        self._logprobs: list[dict[str, Any]] = []   # of tokens whose text has not come yet
        self._seq = 0

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def feed(self, deltas: list[dict[str, Any]], logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One step's deltas, and the logprobs of its tokens (those of a token whose text is held
        back wait for its text)."""
        self._logprobs = _text_logprobs(deltas, self._logprobs + logprobs)
        events: list[dict[str, Any]] = []
        for delta in deltas:
            if delta.get("reasoning_content"):
                events += self._reasoning(delta["reasoning_content"])
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                if "id" in call:
                    events += self._open_item({"id": _new_id("fc"), "type": "function_call",
                                               "status": "in_progress", "call_id": call["id"],
                                               "name": call["function"]["name"], "arguments": ""})
                if call["function"].get("arguments"):
                    events += self._arguments(call["function"]["arguments"])
        return events

    def close(self, status: str) -> list[dict[str, Any]]:
        """The last item's end; `status` "incomplete" if the answer was cut short. An answer of
        nothing but whitespace is still a message."""
        events: list[dict[str, Any]] = []
        if self._space and not self.items:
            events += self._text("", force=True)
        if self._logprobs and self._open is not None and self._open["type"] == "message":
            self._open["content"][0]["logprobs"] += self._logprobs
        return events + self._close_open(status)

    def _index(self) -> int:
        return len(self.items) - 1

    def _open_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close_open("completed")
        self.items.append(item)
        self._open = item
        events.append(self.event("response.output_item.added", output_index=self._index(),
                                 item=copy.deepcopy(item)))
        return events

    def _close_open(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        at = {"item_id": item["id"], "output_index": self.items.index(item)}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", **at, content_index=0,
                                     text=part["text"], logprobs=part["logprobs"]))
            events.append(self.event("response.content_part.done", **at, content_index=0,
                                     part=copy.deepcopy(part)))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self.event("response.reasoning_text.done", **at, content_index=0,
                                     text=part["text"]))
            events.append(self.event("response.content_part.done", **at, content_index=0,
                                     part=copy.deepcopy(part)))
        else:
            events.append(self.event("response.function_call_arguments.done", **at,
                                     name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        events.append(self.event("response.output_item.done", output_index=at["output_index"],
                                 item=copy.deepcopy(item)))
        return events

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != "reasoning":
            events += self._open_item({"id": _new_id("rs"), "type": "reasoning", "summary": [],
                                       "content": [], "encrypted_content": None,
                                       "status": "in_progress"})
            events += self._add_part({"type": "reasoning_text", "text": ""})
        item = self._open
        item["content"][0]["text"] += text
        events.append(self.event("response.reasoning_text.delta", item_id=item["id"],
                                 output_index=self._index(), content_index=0, delta=text))
        return events

    def _text(self, text: str, force: bool = False) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != "message":
            if not (text.strip() or force):   # whitespace before a call is no message of its own
                self._space += text
                return []
            text, self._space = self._space + text, ""
            events += self._open_item({"id": _new_id("msg"), "type": "message", "status": "in_progress",
                                       "role": "assistant", "content": []})
            events += self._add_part({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        part = self._open["content"][0]
        logprobs, self._logprobs = self._logprobs, []
        part["text"] += text
        part["logprobs"] += logprobs
        events.append(self.event("response.output_text.delta", item_id=self._open["id"],
                                 output_index=self._index(), content_index=0, delta=text,
                                 logprobs=logprobs))
        return events

    def _add_part(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        self._open["content"].append(part)
        return [self.event("response.content_part.added", item_id=self._open["id"],
                           output_index=self._index(), content_index=0, part=copy.deepcopy(part))]

    def _arguments(self, text: str) -> list[dict[str, Any]]:
        item = self._open
        item["arguments"] += text
        return [self.event("response.function_call_arguments.delta", item_id=item["id"],
                           output_index=self._index(), delta=text)]


class ResponseRender:
    """Renders one admitted Responses API request: the response object, or its event stream.
    `logprobs` turns a step's token logprobs into the API's entries."""

    def __init__(self, req: ResponsesRequest, rec: RequestRecord, out: ChatOutput, model: str,
                 logprobs: Callable[[list[TokenLogprob]], list[dict[str, Any]]],
                 chat_usage: Callable[[], dict[str, Any]]) -> None:
        self.req, self.rec, self.out, self.model = req, rec, out, model
        self.id = rec.request_id.replace("-", "_", 1)
        self.created = int(rec.created or time.time())
        self.items = OutputItems()
        self._logprobs, self._chat_usage = logprobs, chat_usage

    def response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        done = status in ("completed", "incomplete")
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.model, "output": copy.deepcopy(self.items.items),
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
                "service_tier": "default", "store": False, "truncation": "disabled",
                "completed_at": int(time.time()) if status == "completed" else None,
                "usage": usage(self._chat_usage()) if done else None, **copy.deepcopy(self.req.echo)}

    def _step(self, d: Delta) -> list[dict[str, Any]]:
        deltas = self.out.feed(d.text, len(d.token_ids), final=d.finish_reason is not None)
        lps = self._logprobs(d.logprobs) if self.req.logprobs and d.logprobs else []
        return self.items.feed(deltas, lps)

    def _status(self, finish: str | None) -> str:
        return "incomplete" if finish == "length" else "completed"

    async def json(self, choices: AsyncIterator[tuple[int, Delta]]) -> Response:
        finish = None
        try:
            async for _, d in choices:
                self._step(d)
                finish = d.finish_reason or finish
        except oai.OpenAIError as exc:
            return error_response(self.req.error(exc))
        finally:
            await choices.aclose()
        status = self._status(finish)
        self.items.close(status)
        return JSONResponse(self.response(status))

    async def sse(self, choices: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[str]:
        items = self.items
        try:
            yield _sse(items.event("response.created", response=self.response("in_progress")))
            yield _sse(items.event("response.in_progress", response=self.response("in_progress")))
            finish = None
            async for _, d in choices:
                for ev in self._step(d):
                    yield _sse(ev)
                finish = d.finish_reason or finish
            status = self._status(finish)
            for ev in items.close(status):
                yield _sse(ev)
            yield _sse(items.event(f"response.{status}", response=self.response(status)))
        except oai.OpenAIError as exc:   # the status line is gone: the stream says it failed
            exc = self.req.error(exc)
            yield _sse(items.event("error", code=exc.code, message=exc.message, param=exc.param))
            code = ("server_error" if exc.status >= 500 else "rate_limit_exceeded" if exc.status == 429
                    else "invalid_prompt")   # the codes a failed response's error may have
            yield _sse(items.event("response.failed", response=self.response(
                "failed", {"code": code, "message": exc.message})))
        finally:
            await choices.aclose()


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
