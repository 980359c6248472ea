"""The request side of tool calling: `tools`, `tool_choice` and tool messages, checked and rendered.

Checks what OpenAI refuses (a function's parameters that are not a JSON Schema, a `tool_choice` naming
no given function, a tool message answering no earlier call, arguments that are not a JSON object)
and turns the messages into what a chat template takes: with the model's own tool support
(`tools=` to the template), or, for a template without it, the hermes-style fallback prompt below.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from ...engine.sampling import StructuredOutput
from ...engine.structured_output import unenforceable

# chat_template_kwargs may not set what the server passes to the template, nor the other named
# arguments of transformers' apply_chat_template (they would change what it returns).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "max_bytes"})


class ToolsError(ValueError):
    """A tools-related field the server refuses (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def parameters_schema(fn: FunctionDef) -> dict[str, Any]:
    """A function's parameters schema (OpenAI: an absent one means no arguments); arguments are an
    object, so a schema that leaves the type open (`{}`) is one of an object."""
    if fn.parameters is None:
        return {"type": "object", "properties": {}}
    return fn.parameters if "type" in fn.parameters else {**fn.parameters, "type": "object"}


def check_tools(tools: list[Tool] | None, tool_choice: ToolChoice | None) -> None:
    """Refuse a tool list or tool_choice OpenAI refuses."""
    names: set[str] = set()
    for i, tool in enumerate(tools or []):
        fn = tool.function
        if fn.name in names:
            raise ToolsError(f"tools.{i}: function name {fn.name!r} is given twice", f"tools.{i}.function.name")
        names.add(fn.name)
        schema = parameters_schema(fn)
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)\
                .check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ToolsError(f"tools.{i}.function.parameters is not a valid JSON Schema: {exc.message}",
                             f"tools.{i}.function.parameters") from None
        except RecursionError:
            raise ToolsError(f"tools.{i}.function.parameters nests too deeply",
                             f"tools.{i}.function.parameters") from None
        if schema.get("type", "object") != "object":
            raise ToolsError(f"tools.{i}.function.parameters must describe an object (type "
                             f"'object'), not {schema.get('type')!r}", f"tools.{i}.function.parameters")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise ToolsError(f"tool_choice names the function {tool_choice.function.name!r}, which is "
                             f"not among the tools", "tool_choice")
    elif tool_choice == "required" and not names:
        raise ToolsError("tool_choice 'required' needs at least one tool", "tool_choice")
    elif tool_choice == "auto" and tools is None:
        # as OpenAI and vLLM refuse it ("none" asks for nothing; an empty list is no tools, as in vLLM)
        raise ToolsError("tool_choice 'auto' needs tools", "tool_choice")


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    bad = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs or {}))
    if bad:
        raise ToolsError(f"chat_template_kwargs may not set {', '.join(bad)}: the server sets "
                         f"{'it' if len(bad) == 1 else 'them'}", "chat_template_kwargs")


def _arguments(call: ToolCall, where: str) -> dict[str, Any]:
    try:
        args = json.loads(call.function.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise ToolsError(f"{where}.function.arguments must be a JSON object as text, got "
                         f"{call.function.arguments[:60]!r}", f"{where}.function.arguments")
    return args


def template_messages(messages: list[Any], native_tools: bool) -> list[dict[str, Any]]:
    """The request's messages as a chat template takes them (HF's convention: tool-call arguments
    as dicts, a tool message with the name of the call it answers). Without `native_tools` the
    calls and results are written into the text the hermes way, as the fallback prompt describes."""
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # id -> function name of every call made so far
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls and role != "assistant":
            raise ToolsError(f"messages.{i}: only assistant messages carry tool_calls",
                             f"messages.{i}.tool_calls")
        if role == "tool":
            if m.tool_call_id is None or m.tool_call_id not in calls:
                raise ToolsError(f"messages.{i}: a tool message must answer a tool call of an earlier "
                                 f"assistant message (tool_call_id {m.tool_call_id!r} is not one)",
                                 f"messages.{i}.tool_call_id")
            if native_tools:
                out.append({"role": "tool", "tool_call_id": m.tool_call_id,
                            "name": calls[m.tool_call_id], "content": m.text()})
            else:
                out.append({"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"})
            continue
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if m.name is not None:   # templates that know participants' names read it, as from vLLM
            msg["name"] = m.name
        if m.reasoning_content is not None:   # as vLLM passes it; templates that know it keep it
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            parsed = [(c, _arguments(c, f"messages.{i}.tool_calls.{j}")) for j, c in enumerate(m.tool_calls)]
            calls.update((c.id, c.function.name) for c, _ in parsed)
            if native_tools:
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": args}}
                                     for c, args in parsed]
            else:
                msg["content"] = "\n".join(
                    [msg["content"]] * bool(msg["content"]) +
                    [f"<tool_call>\n{json.dumps({'name': c.function.name, 'arguments': a})}\n</tool_call>"
                     for c, a in parsed])
        out.append(msg)
    return out


# The hermes prompt of Qwen2.5's template, for templates that take no tools (the embedded SmolLM2).
FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def with_fallback_prompt(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """`messages` with the functions described in the system message (one is added if absent)."""
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    prompt = FALLBACK_TOOLS_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# Consecutive whitespace the grammar lets a call's arguments hold: a small model given free whitespace
# pads an argument-less call's `{}` with newlines until max_tokens (as in the engine's JSON style).
MAX_ARGUMENT_WHITESPACE = 1


def _bounded_whitespace(node: Any) -> Any:
    """A structural tag with every JSON-schema content held to MAX_ARGUMENT_WHITESPACE (xgrammar's
    own parameter for it does not reach a single forced function's content)."""
    if isinstance(node, list):
        return [_bounded_whitespace(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_whitespace(v) for k, v in node.items()}
    if out.get("type") == "json_schema" and "max_whitespace_cnt" in out:
        out["max_whitespace_cnt"] = MAX_ARGUMENT_WHITESPACE
    return out


def _only_calls(node: Any) -> Any:
    """A structural tag whose calls may not be followed, nor preceded, by free text: xgrammar's
    hermes-style format (Qwen's) lets text run around the calls ("triggered tags"), so a model made
    to call with tool_choice "required" could write on after its calls until max_tokens, text the
    response then drops. The calls are kept, one per line, with nothing else, as in DeepSeek's and
    Kimi's formats (and as vLLM's "required", a JSON array of calls, allows)."""
    if isinstance(node, list):
        return [_only_calls(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "triggered_tags":   # and a newline after the last call may end it
        calls = {"type": "tags_with_separator", "tags": node["tags"], "separator": "\n",
                 "at_least_one": node.get("at_least_one", False),
                 "stop_after_first": node.get("stop_after_first", False)}
        return {"type": "sequence", "elements": [
            calls, {"type": "optional", "content": {"type": "const_string", "value": "\n"}}]}
    return {k: _only_calls(v) for k, v in node.items()}


def _enforced(tool: Tool) -> dict[str, Any]:
    """A tool as the grammar takes it: its parameters the schema the arguments must match."""
    fields = tool.model_dump(exclude_none=True)
    return {**fields, "function": {**fields["function"], "parameters": parameters_schema(tool.function)}}


def constrained_calls(xgrammar_model: str, tools: list[Tool], tool_choice: ToolChoice | None,
                      reasoning: str, parallel: bool) -> StructuredOutput | None:
    """For tool_choice "required" or a named function: a grammar (xgrammar's structural tag for the
    model's tool-call format) that makes the answer one or more calls, or that call, whose arguments
    match the functions' parameter schemas. `reasoning`: "enabled" (the answer starts inside the
    reasoning), "auto" (it may open one) or "disabled". None when the choice constrains nothing."""
    if tool_choice != "required" and not isinstance(tool_choice, NamedToolChoice):
        return None
    import xgrammar as xgr

    named = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else None
    for i, tool in enumerate(tools):   # the grammar holds the named function's arguments, or every one's
        if (tool.function.strict and named in (None, tool.function.name)
                and (problem := unenforceable(parameters_schema(tool.function)))):
            raise ToolsError(f"tools.{i}.function.parameters (strict): {problem}",
                             f"tools.{i}.function.parameters")
    choice = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump()
    try:
        tag = xgr.get_model_structural_tag(
            xgrammar_model, tools=[_enforced(t) for t in tools], tool_choice=choice,
            reasoning=reasoning, parallel_tool_calls=parallel)
        return StructuredOutput("structural_tag",
                                json.dumps(_bounded_whitespace(_only_calls(tag.model_dump()))))
    except ValueError as exc:  # a parameters schema xgrammar cannot compile
        raise ToolsError(f"the tools' parameter schemas cannot be enforced: {exc}", "tools") from None
