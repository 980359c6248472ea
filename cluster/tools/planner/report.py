"""What the planner tells a reader: its assumptions term by term, its errors against published runs it
was not fitted on, the EP+MTP sanity check, and the decode-choice table for a target topology."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..simulator import Topology, Workload, simulate
from .decode import DecodeLayout, Speculative
from .hardware import ASCEND_910C_DIE
from .profile import Profile

# The vendor's public brief: one request, 512 tokens out, 8 x 910B TP8: per-request TPS at long inputs.
PUBLIC_LONG_CONTEXT: tuple[tuple[int, float], ...] = ((20000, 38.8), (60000, 33.7))
# SGLang's Ascend best-practice page: DeepSeek-R1 W8A8 on 2 nodes x 16 Ascend 910C dies, DP16 attention,
# EP32, MTP with 3 draft tokens, 32 concurrent, 6K in / 1.6K out: TPOT ~ 20 ms.
SGLANG_910C_TPOT_MS = 20.0


@dataclass(frozen=True)
class RowError:
    """One published row against the planner's prediction (relative errors are predicted/measured - 1)."""

    input_len: int
    concurrency: int
    tpot_ms: float
    predicted_tpot_ms: float
    ttft_s: float | None
    predicted_ttft_s: float

    @property
    def tpot_err(self) -> float:
        return self.predicted_tpot_ms / self.tpot_ms - 1

    @property
    def ttft_err(self) -> float | None:
        return None if self.ttft_s is None else self.predicted_ttft_s / self.ttft_s - 1


def predict_rows(profile: Profile, rows: Iterable[Mapping[str, float]], input_len: int,
                 output_len: int) -> list[RowError]:
    """Simulate each measured closed-loop level on one colocated node (the vendor's setup): mean TTFT
    and mean TPOT against the row's (a row without ttft_s is compared on TPOT only). The vendor ran TP8
    without speculation, so the profile's decode choice is set to that."""
    profile = profile.with_decode("tp", None)
    out = []
    for r in rows:
        c = int(r["concurrency"])
        stats = simulate(profile, Topology(colocated_nodes=1), Workload(c, input_len, output_len, 2)).stats
        out.append(RowError(input_len, c, r["tpot_ms"], stats.tpot_mean_ms, r.get("ttft_s"), stats.ttft_mean_s))
    return out


def long_context_rows(profile: Profile) -> list[RowError]:
    """The vendor's public single-request long-context points against the profile."""
    return [e for n, tps in PUBLIC_LONG_CONTEXT
            for e in predict_rows(profile, [{"concurrency": 1, "tpot_ms": 1000 / tps}], n, 512)]


def format_errors(errors: Sequence[RowError]) -> str:
    lines = ["| Input | Conc. | TPOT meas. (ms) | TPOT pred. | err | TTFT meas. (s) | TTFT pred. | err |",
             "|---|---|---|---|---|---|---|---|"]
    for e in errors:
        ttft = "-" if e.ttft_s is None else f"{e.ttft_s:.3f}"
        ttft_err = "-" if e.ttft_err is None else f"{100 * e.ttft_err:+.1f}%"
        lines.append(f"| {e.input_len} | {e.concurrency} | {e.tpot_ms:.1f} | {e.predicted_tpot_ms:.1f} "
                     f"| {100 * e.tpot_err:+.1f}% | {ttft} | {e.predicted_ttft_s:.3f} | {ttft_err} |")
    return "\n".join(lines)


def sglang_910c_check(profile: Profile, acceptance: float, weight_efficiency: float | None = None) -> float:
    """Predicted TPOT (ms) of SGLang's 910C point with this profile's fitted constants (or another
    weight-read efficiency): 910C dies taken as 910B1s, W8A8 weights (1 byte), 32 sequences over 16
    attention groups of 2 dies, EP over 32 dies, MTP 3 drafts at `acceptance` per position, mean
    context 6K + 1.6K/2."""
    model = dataclasses.replace(profile.model, weight_bytes=1.0)
    decode = dataclasses.replace(profile.decode,
                                 weight_efficiency=weight_efficiency or profile.decode.weight_efficiency)
    layout = DecodeLayout.ep(ASCEND_910C_DIE, nodes=2, attn_tp=2)
    cost = decode.cost(model, ASCEND_910C_DIE, layout, seqs=2, ctx_tokens=2 * (6000 + 800), pool_seqs=32,
                       spec=Speculative(3, (acceptance,)))
    return cost.total_ms / cost.tokens_per_seq


def decode_choices(profile: Profile, ks: Sequence[int] = (1, 2, 3),
                   acceptances: Sequence[float] = (0.6, 0.75, 0.9)) -> list[Profile]:
    """{TP replica, EP pool} x {no MTP, MTP k at each acceptance}."""
    specs: list[Speculative | None] = [None] + [Speculative(k, (a,)) for k in ks for a in acceptances]
    return [profile.with_decode(parallel, spec) for parallel in ("tp", "ep") for spec in specs]


def largest_concurrency(profile: Profile, topology: Topology, input_len: int, output_len: int,
                        min_tps: float, limit: int) -> int:
    """The largest closed-loop concurrency up to `limit` whose simulated per-request TPS is >= min_tps
    (0 if none), by bisection (TPS falls as concurrency grows)."""
    def ok(c: int) -> bool:
        return simulate(profile, topology, Workload(c, input_len, output_len, 1)).stats.tps >= min_tps
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


@dataclass(frozen=True)
class PlanRow:
    decode: str
    input_len: int
    tps: float
    ttft_s: float
    largest_at_min_tps: int
    limit: int  # the decode nodes' batch cap: beyond it requests wait inside the engines

    @property
    def largest_label(self) -> str:
        return f">= {self.limit} (batch cap)" if self.largest_at_min_tps >= self.limit else str(self.largest_at_min_tps)


def plan_table(profiles: Iterable[Profile], topology: Topology, concurrency: int, input_lens: Sequence[int],
               output_len: int, min_tps: float) -> list[PlanRow]:
    """Per-request TPS at `concurrency` and the largest concurrency at >= min_tps, for each decode
    choice and input length (up to the decode nodes' batch cap)."""
    rows = []
    for p in profiles:
        limit = (topology.decode_nodes or topology.colocated_nodes) * p.max_batch_seqs
        for n in input_lens:
            stats = simulate(p, topology, Workload(concurrency, n, output_len, 2)).stats
            rows.append(PlanRow(p.decode_label, n, stats.tps, stats.ttft_mean_s,
                                largest_concurrency(p, topology, n, output_len, min_tps, limit), limit))
    return rows


def format_plan(rows: Sequence[PlanRow], topology: Topology, concurrency: int, min_tps: float) -> str:
    lens = sorted({r.input_len for r in rows})
    by = {(r.decode, r.input_len): r for r in rows}
    head = ("| Decode | " + " | ".join(f"TPS @{concurrency}, {n} in | max conc. >= {min_tps:g} tok/s, {n} in"
                                       for n in lens) + " |")
    lines = [f"{topology.label}, {concurrency} concurrent, per-request TPS (simulated)", "", head,
             "|---|" + "---|---|" * len(lens)]
    for label in dict.fromkeys(r.decode for r in rows):
        cells = [f"{by[label, n].tps:.1f} | {by[label, n].largest_label}" for n in lens]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def assumptions(profile: Profile, workload: Workload, topology: Topology | None = None) -> list[str]:
    """The model's assumptions in words, term by term with each constant's source, for the CLI to print
    next to its numbers (both modes' when no topology is given)."""
    hw, m, pf, d, h = profile.hardware, profile.model, profile.prefill, profile.decode, profile.handoff
    lines = [
        f"profile {profile.name}: {profile.description}".rstrip(": "),
        (f"hardware {hw.name}, {hw.chips_per_node} per node: {hw.peak_tflops:g} TFLOP/s, {hw.hbm_gb_s:g} GB/s "
         f"HBM, {hw.intra_node_gb_s:g} GB/s in-node, {hw.inter_node_gb_s:g} GB/s between nodes per chip "
         f"({hw.source})"),
        (f"model {m.name}: {m.active_params / 1e9:.1f}B active params/token, {m.weight_bytes:g} B per weight, "
         f"{m.kv_bytes_per_token:.0f} B KV/token, {m.routed_experts} experts top-{m.experts_per_token}"),
        (f"prefill step (ms) = {pf.step_ms:.1f} [fitted] + {pf.per_seq_ms:.1f} [fitted] x prompts + FLOPs / "
         f"({hw.chips_per_node} x {hw.peak_tflops:g} TFLOP/s x mfu {pf.mfu:g} [assumed]); steps of at most "
         f"{pf.max_batch_tokens} tokens, longer prompts chunked; the prefill samples the first token"),
        (f"decode step (ms) = {d.overhead_ms:.2f} [fitted] + the longer of weight bytes / (HBM x "
         f"{d.weight_efficiency:.3f} [fitted]) + KV bytes / (HBM x {d.kv_efficiency:g} [assumed]) and FLOPs / "
         f"(TFLOP/s x mfu {d.mfu:g} [assumed]); decode: {profile.decode_label}"),
    ]
    if profile.decode_parallel == "ep":
        lines.append(f"EP pool: routed experts spread over every decode chip, attention data-parallel in groups "
                     f"of {profile.attn_tp or hw.chips_per_node}, dispatch + combine per MoE layer "
                     f"{hw.a2a_latency_us:g} us [assumed] + bytes / {hw.inter_node_gb_s:g} GB/s, overlapped "
                     "with the expert reads; nodes step with the pool's current load (no lockstep barrier)")
    if profile.speculative:
        s = profile.speculative
        lines.append(f"MTP: {s.k} draft passes of the MTP layer + verification of {s.k + 1} tokens per sequence; "
                     f"acceptance {s.acceptance} per position [assumed] -> {s.mean_accepted:.2f} tokens/step")
    lines.append(f"closed loop: {workload.concurrency} clients x {workload.requests_per_client} requests, "
                 f"{workload.input_len} tokens in, exactly {workload.output_len} out, no think time, no prefix reuse")
    if topology is None or topology.colocated_nodes:
        lines.append("colocated: a node prefills newcomers before its next decode step (decode stalls)")
    if topology is None or not topology.colocated_nodes:
        lines.append(f"disaggregated: KV handoff = {h.latency_ms:.1f} ms + {h.bytes_per_token:.0f} B/token "
                     f"/ {h.bandwidth_gb_s:.0f} GB/s, transfers in parallel without contention; "
                     "decode nodes never prefill")
    lines.append("router: the router's own AdmissionController and place() (prefill: least outstanding "
                 "prompt tokens; decode: fewest sequences with KV blocks for prompt + output, else the "
                 "least busy node, whose engine holds the request until blocks free up)")
    return lines

