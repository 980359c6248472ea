"""Prefill step time from the model's FLOPs and the hardware's TFLOP/s, plus two fitted overheads;
prompts longer than a step's token budget are prefilled in chunks (chunked prefill)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .hardware import Hardware, ModelArch


@dataclass(frozen=True)
class PrefillCost:
    """One prefill batch's time split by term, in ms."""

    steps: int
    overhead_ms: float  # step_ms per step + per_seq_ms per prompt piece
    matmul_ms: float  # 2 x active params FLOPs per prompt token
    attention_ms: float  # causal attention over each token's context

    @property
    def total_ms(self) -> float:
        return self.overhead_ms + self.matmul_ms + self.attention_ms


@dataclass(frozen=True)
class PrefillModel:
    """Prefill of a batch of prompts, packed into steps of at most max_batch_tokens tokens (a prompt
    that does not fit is split across steps; later pieces attend to the earlier ones). Each step costs

        step_ms + per_seq_ms x prompts in the step
        + (2 x active params x tokens + attention FLOPs) / (chips x peak TFLOP/s x mfu)

    attention FLOPs = layers x 2 x heads x (qk + v head dims) x (query, key) pairs, causal.
    step_ms and per_seq_ms are fitted; mfu (the fraction of peak the matmuls reach) is assumed: with
    prompts of one length, per-prompt overhead and per-token cost cannot be told apart by a fit."""

    step_ms: float
    per_seq_ms: float
    mfu: float = 0.3
    max_batch_tokens: int = 16384

    def cost(self, prompts: Sequence[int], arch: ModelArch, hw: Hardware) -> PrefillCost:
        flops_per_ms = hw.chips_per_node * hw.peak_tflops * 1e9 * self.mfu
        steps = pieces = tokens = 0
        pairs = 0.0
        room = 0
        for n in prompts:
            done = 0
            while done < n:
                if room == 0:
                    steps, room = steps + 1, self.max_batch_tokens
                take = min(room, n - done)
                pieces += 1
                tokens += take
                end = done + take
                pairs += (end * (end + 1) - done * (done + 1)) / 2
                done, room = end, room - take
        return PrefillCost(
            steps, steps * self.step_ms + pieces * self.per_seq_ms,
            2 * arch.active_params * tokens / flops_per_ms,
            arch.layers * arch.attention_flops_per_pair * pairs / flops_per_ms)

    def time_s(self, prompts: Sequence[int], arch: ModelArch, hw: Hardware) -> float:
        return self.cost(prompts, arch, hw).total_ms / 1000
