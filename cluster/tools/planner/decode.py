"""Decode step time per rank: a fitted per-step overhead plus weight and KV-cache reads at HBM bandwidth
(or the FLOPs, if longer), for a TP replica or an expert-parallel pool, with or without MTP speculation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .hardware import Hardware, ModelArch

DECODE_PARALLEL = ("tp", "ep")


@dataclass(frozen=True)
class Speculative:
    """MTP speculation: k draft tokens per step; acceptance[i] = P(draft i+1 accepted | drafts 1..i
    accepted) (one value applies to every position)."""

    k: int
    acceptance: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"speculative k must be >= 1, got {self.k}")
        if len(self.acceptance) not in (1, self.k) or not all(0 <= a <= 1 for a in self.acceptance):
            raise ValueError(f"acceptance needs 1 or k={self.k} values in [0, 1], got {self.acceptance}")

    def at(self, position: int) -> float:
        return self.acceptance[min(position, len(self.acceptance) - 1)]

    @property
    def mean_accepted(self) -> float:
        """Tokens a sequence gains per step: the verified token plus the accepted draft prefix,
        1 + a1 + a1 a2 + ... + a1..ak."""
        total, p = 1.0, 1.0
        for i in range(self.k):
            p *= self.at(i)
            total += p
        return total

    @property
    def label(self) -> str:
        return f"mtp:{self.k}@{'/'.join(f'{a:g}' for a in self.acceptance)}"


@dataclass(frozen=True)
class DecodeLayout:
    """How a decode pool's ranks split the work. TP replica: each node is one group of
    chips_per_node ranks that shards attention and every expert. EP pool: the pool's nodes hold the
    routed experts spread over all ranks (whole experts per rank), attention is data-parallel over
    groups of attn_tp ranks, tokens reach their experts by a dispatch and a combine all-to-all."""

    parallel: str  # "tp" or "ep"
    attn_tp: int  # ranks that shard one group's attention, dense and shared-expert weights
    pool_ranks: int  # ranks holding the routed experts (TP: one node's chips)

    def __post_init__(self) -> None:
        if self.parallel not in DECODE_PARALLEL:
            raise ValueError(f"unknown decode model {self.parallel!r}: one of {', '.join(DECODE_PARALLEL)}")
        if self.attn_tp < 1 or self.pool_ranks < self.attn_tp:
            raise ValueError(f"bad decode layout: attn_tp={self.attn_tp}, pool_ranks={self.pool_ranks}")

    @classmethod
    def tp(cls, hw: Hardware) -> DecodeLayout:
        return cls("tp", hw.chips_per_node, hw.chips_per_node)

    @classmethod
    def ep(cls, hw: Hardware, nodes: int, attn_tp: int | None = None) -> DecodeLayout:
        return cls("ep", attn_tp or hw.chips_per_node, nodes * hw.chips_per_node)


@dataclass(frozen=True)
class DecodeCost:
    """One decode step of one attention group, split by term (ms), and the tokens each sequence gains."""

    overhead_ms: float
    static_reads_ms: float  # attention, dense, shared-expert and LM-head weights
    kv_reads_ms: float  # the group's own sequences' MLA cache
    expert_reads_ms: float  # routed experts the tokens touch, this rank's share
    all_to_all_ms: float  # EP dispatch + combine (overlapped with the expert reads)
    compute_ms: float  # matmul and MLA attention FLOPs (overlapped with the reads: the longer counts)
    tokens_per_seq: float = 1.0
    draft: DecodeCost | None = None  # one MTP draft pass
    draft_passes: int = 0

    @property
    def moe_ms(self) -> float:
        return max(self.expert_reads_ms, self.all_to_all_ms)

    @property
    def draft_ms(self) -> float:
        return self.draft_passes * self.draft.total_ms if self.draft else 0.0

    @property
    def memory_ms(self) -> float:
        return self.static_reads_ms + self.kv_reads_ms + self.moe_ms

    @property
    def total_ms(self) -> float:
        return self.overhead_ms + max(self.memory_ms, self.compute_ms) + self.draft_ms

    @property
    def bound_by_expert_reads(self) -> bool:
        """The MoE layers (draft passes included) wait on routed-expert weight reads, not on the
        all-to-all."""
        return self.expert_reads_ms >= self.all_to_all_ms and (self.draft is None or self.draft.bound_by_expert_reads)


@dataclass(frozen=True)
class DecodeModel:
    """Per-rank decode step:

        overhead_ms x (layers run / layers)
        + (static weights / attn_tp + distinct routed experts x expert bytes / pool ranks) x layers
          / (HBM GB/s x weight_efficiency)
        + context tokens x KV bytes per token / (HBM GB/s x kv_efficiency)
        + EP only: dispatch + combine per MoE layer, latency + bytes / network or HCCS GB/s (the
          share of the experts on other nodes or this one), overlapped with the
          expert reads (the MoE layer takes the longer of the two)
        unless the FLOPs take longer (roofline): (2 x params each token multiplies through + MLA
        attention, absorbed: 2 x heads x (2 x kv_lora + rope) per query and context token x layers)
        / (TFLOP/s x mfu)

    Distinct experts: E (1 - (1 - k/E)^T) for the T tokens the experts' group sees (a node's batch for a
    TP replica, the whole pool's for EP). overhead_ms (kernel launches, TP all-reduces, sampling) and
    weight_efficiency (the share of HBM bandwidth the w4a16 grouped matmuls reach) are fitted; the
    KV-cache reads are plain bf16 streams at kv_efficiency of HBM bandwidth (assumed, 1 by default);
    mfu is assumed (the prefill's).
    With MTP, a step runs k draft passes of the MTP layer (one sequence token each) and verifies
    k + 1 tokens per sequence in one pass of the main model."""

    overhead_ms: float
    weight_efficiency: float
    kv_efficiency: float = 1.0
    mfu: float = 0.3

    def cost(self, arch: ModelArch, hw: Hardware, layout: DecodeLayout, seqs: int, ctx_tokens: int,
             pool_seqs: int | None = None, spec: Speculative | None = None) -> DecodeCost:
        """One step of an attention group decoding `seqs` sequences holding `ctx_tokens` of context;
        `pool_seqs`: sequences across the EP pool (default: the group's, scaled to the pool)."""
        if pool_seqs is None:
            pool_seqs = seqs * layout.pool_ranks // layout.attn_tp
        q = 1 + (spec.k if spec else 0)  # tokens per sequence through the main model
        main = self._pass(arch, hw, layout, arch.layers, arch.dense_layers, arch.moe_layers,
                          seqs * q, pool_seqs * q, ctx_tokens, q)
        if not spec:
            return main
        draft = self._pass(arch, hw, layout, arch.mtp_layers, 0, arch.mtp_layers, seqs, pool_seqs, ctx_tokens, 1)
        return dataclasses.replace(main, tokens_per_seq=spec.mean_accepted, draft=draft, draft_passes=spec.k)

    def _pass(self, arch: ModelArch, hw: Hardware, layout: DecodeLayout, layers: int, dense: int,
              moe: int, tokens: int, pool_tokens: int, ctx_tokens: float, queries: int) -> DecodeCost:
        """One forward pass of `layers` layers for `tokens` query tokens of the group (`pool_tokens` in
        the EP pool), `queries` per sequence, over the group's `ctx_tokens` of context."""
        bytes_per_ms = hw.hbm_gb_s * 1e6
        static_params = arch.static_params(layers, dense, moe)
        static = (static_params * arch.weight_bytes + arch.head_params * arch.head_bytes) / layout.attn_tp
        moe_tokens = tokens if layout.parallel == "tp" else pool_tokens
        experts = (arch.distinct_experts(moe_tokens) * arch.expert_params * arch.weight_bytes * moe
                   / layout.pool_ranks)
        flops = (2 * tokens * (static_params + arch.head_params) / layout.attn_tp
                 + 2 * moe_tokens * arch.experts_per_token * arch.expert_params * moe / layout.pool_ranks
                 + ctx_tokens * queries * layers * arch.decode_attention_flops_per_pair / layout.attn_tp)
        a2a = 0.0
        if layout.parallel == "ep" and moe:
            # each rank sends its share of the group's tokens to k experts (bf16 hidden states), the
            # other nodes' share over the network, its own node's over HCCS
            sent = math.ceil(tokens / layout.attn_tp) * arch.experts_per_token * arch.hidden * 2
            local = min(layout.pool_ranks, hw.chips_per_node) / layout.pool_ranks
            a2a = moe * 2 * (hw.a2a_latency_us / 1000 + sent * (1 - local) / (hw.inter_node_gb_s * 1e6)
                             + sent * local / (hw.intra_node_gb_s * 1e6))
        return DecodeCost(
            self.overhead_ms * layers / arch.layers,
            static / (bytes_per_ms * self.weight_efficiency),
            ctx_tokens * arch.kv_bytes_per_token * layers / arch.layers / (bytes_per_ms * self.kv_efficiency),
            experts / (bytes_per_ms * self.weight_efficiency), a2a,
            flops / (hw.peak_tflops * 1e9 * self.mfu))
