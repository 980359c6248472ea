"""A chat request made ready for the engine: its prompt rendered by the model's chat template (with
the tools and chat_template_kwargs), the parser of its answer, and the grammar that enforces a
required or named tool choice. `ChatFormat` is the model's side of it, fixed when the ingress starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ...engine.sampling import StructuredOutput
from ...engine.structured_output import GrammarChecksBusy
from ...engine.tokenizer import RenderedTooLong
from . import openai_protocol as oai
from . import tool_calls
from .chat_output import ChatOutput, default_parsers, model_type
from .reasoning_parsers import reasoning_parser
from .tool_parsers import tool_call_format

PROMPT_TAIL_TOKENS = 8  # enough to see whether the template opened `<think>`


@dataclass(frozen=True)
class ChatFormat:
    """How the served model's chats are rendered and parsed. `native_tools`: its template renders
    tools itself (else they go in the fallback prompt, tool_calls.py)."""
    reasoning_parser: str | None
    tool_call_parser: str
    native_tools: bool

    @classmethod
    def for_model(cls, model_path: Path, chat_template: Any, reasoning: str = "auto",
                  tools: str = "auto") -> ChatFormat:
        """The spec's parsers (`serve.reasoning_parser`, `serve.tool_call_parser`), "auto" ones
        chosen by the model's architecture."""
        template = chat_template if isinstance(chat_template, str) else " ".join((chat_template or {}).values())
        auto_reasoning, auto_tools = default_parsers(model_type(model_path), template)
        chosen = auto_reasoning if reasoning == "auto" else None if reasoning == "none" else reasoning
        return cls(chosen, auto_tools if tools == "auto" else tools, "tools" in template)


@dataclass(frozen=True)
class PreparedChat:
    prompt_ids: list[int]
    output: ChatOutput
    constraint: StructuredOutput | None  # tool_choice "required" or a named function, else None


def prepare_chat(tokenizer: Any, req: oai.ChatCompletionRequest, fmt: ChatFormat,
                 max_prompt_bytes: int | None = None) -> PreparedChat:
    """Render `req` with `tokenizer`'s chat template; any problem is an OpenAIError (400).
    `max_prompt_bytes`: a rendered prompt longer than that cannot fit the context (app.py,
    `_provable_prompt_bytes`) and is refused before it is tokenized."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.uses_tools and fmt.native_tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    messages = req.chat(fmt.native_tools)
    if max_prompt_bytes is not None:
        kwargs["max_bytes"] = max_prompt_bytes
    try:
        ids = tokenizer.apply_chat_template(messages, **kwargs)
    except RenderedTooLong as exc:
        raise oai.OpenAIError(400, f"the prompt is {exc.size} bytes as the chat template renders "
                              f"it; this server takes at most {exc.limit}", param="messages",
                              code="context_length_exceeded") from None
    except ValueError as exc:  # no chat template
        raise oai.OpenAIError(400, str(exc), param="messages") from None
    except (jinja2.TemplateError, TypeError) as exc:  # the template refused these messages
        raise oai.OpenAIError(400, f"the model's chat template cannot render these messages: {exc}",
                              param="messages") from None
    parser = None
    if fmt.reasoning_parser:
        tail = tokenizer.decode(ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
        parser = reasoning_parser(fmt.reasoning_parser, tail, req.chat_template_kwargs or {})
    parallel = req.parallel_tool_calls is not False
    calls = tool_call_format(fmt.tool_call_parser) if req.uses_tools else None
    constraint = None
    if calls is not None:
        mode = "disabled" if parser is None else "enabled" if parser.forced else "auto"
        try:
            constraint = tool_calls.constrained_calls(calls.xgrammar_model, req.tools, req.tool_choice,
                                                      mode, parallel)
        except tool_calls.ToolsError as exc:
            raise oai.OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from None
        except GrammarChecksBusy as exc:
            raise oai.grammar_checks_busy(exc) from None
    return PreparedChat(ids, ChatOutput(parser, calls, parallel), constraint)
