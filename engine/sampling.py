"""Per-request sampling parameters, validated at construction.

Invalid values raise `ValueError` with a message fit for an HTTP 400 body.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .structured_output import StructuredOutput

__all__ = ["SamplingParams", "StructuredOutput"]

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0   # OpenAI's bound on a logit_bias value
MAX_LOGIT_BIAS_ENTRIES = 1024
MIN_REPETITION_PENALTY = 0.01  # dividing a logit by less could overflow it to inf
GREEDY_BELOW = 1e-5  # temperatures under this are greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16          # None: until the context is full
    temperature: float = 1.0             # 0 (anything below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: disabled
    min_p: float = 0.0                   # tokens less likely than min_p times the likeliest are cut; 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None          # None: off; N: chosen token plus top-N alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True     # False: special tokens' text stays in the output (tool markers)
    # OpenAI's penalties over the generated tokens: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's over prompt and generated tokens: a seen token's logit is divided by it (if > 0)
    # or multiplied by it (if < 0); 1 is off
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit); a dict is taken
    min_tokens: int = 0                  # EOS and stop_token_ids are masked until this many tokens
    structured_output: StructuredOutput | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 <= float(self.min_p) <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if len(self.stop) > 16:
            raise ValueError("at most 16 stop strings are supported")
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        try:
            bias = tuple(sorted((int(t), float(b)) for t, b in self.logit_bias))
        except (TypeError, ValueError):
            raise ValueError("logit_bias must map token ids to numbers") from None
        object.__setattr__(self, "logit_bias", bias)
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens")
        if any(not (-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS) for _, b in bias):
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= float(getattr(self, name)) <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (MIN_REPETITION_PENALTY <= float(self.repetition_penalty) <= 2.0):
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2], "
                             f"got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise ValueError("structured_output must be a StructuredOutput")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature this small overflows float32 (inf/NaN probabilities).
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """The next token depends on more than the model's logits (penalties, bias, a grammar,
        min_tokens): such a sequence drafts no tokens for speculative decoding."""
        return bool(self.has_penalties or self.logit_bias or self.min_tokens
                    or self.structured_output is not None)
