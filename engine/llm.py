"""Offline API: `LLM(model).generate(prompts, SamplingParams)` runs all prompts as one batch."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import TokenLogprob
from .sampling import SamplingParams


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LLM:
    def __init__(self, model: str = "embedded", **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Each prompt is text or token ids; returns one Completion per prompt, in order."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        for prompt, p in zip(prompts, plist):
            self._counter += 1
            rid = f"offline-{self._counter}"
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.engine.add_request(rid, params=p, prompt_token_ids=token_ids)
            results[rid] = Completion(token_ids, [], "", None)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                c = results[out.request_id]
                c.token_ids += out.new_token_ids
                c.text += out.delta_text
                c.logprobs += out.logprobs
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason
        return list(results.values())
