"""Discrete-event simulator of a PD-disaggregated (xPyD) or colocated cluster, for capacity planning.

It drives the real AdmissionController and routing policies with simulated nodes whose step times come
from a profile fitted to measurements (`fit_profile`), and reports the same metrics as the benchmark.
"""
from __future__ import annotations

import csv
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..policy.admission import AdmissionConfig, AdmissionController, Verdict
from ..policy.placement import WorkerLoad, decode_blocks_needed, place
from .perf_metrics import LevelStats, RequestTrace, summarize

# Heaps' law exponent used when the data cannot pin the decode batch exponent (fewer than 3 points).
DEFAULT_BATCH_EXPONENT = 0.5


@dataclass(frozen=True)
class PrefillModel:
    """Prefill step time = base + per_token x prompt tokens in the batch (a batch packs waiting
    prompts up to max_batch_tokens)."""

    base_ms: float
    per_token_ms: float
    max_batch_tokens: int = 16384

    def time_s(self, tokens: int) -> float:
        return (self.base_ms + self.per_token_ms * tokens) / 1000


@dataclass(frozen=True)
class DecodeModel:
    """Decode step time = base + batch_coef x batch^batch_exponent + ctx_coef x context tokens.

    base: per-step cost independent of the batch (dense/attention/shared-expert weights, kernel
    launches, TP all-reduces). batch term: MoE routed-expert weights touched by the batch; the number
    of distinct experts B tokens activate grows sublinearly in B (Heaps' law under skewed routing) and
    small-batch decode is bound by reading those weights. ctx term: reading the KV cache, bytes per
    context token / HBM bandwidth, from the hardware rather than fitted.
    """

    base_ms: float
    batch_coef_ms: float
    batch_exponent: float
    ctx_coef_ms: float

    def step_s(self, batch: int, ctx_tokens: int) -> float:
        return (self.base_ms + self.batch_coef_ms * batch ** self.batch_exponent
                + self.ctx_coef_ms * ctx_tokens) / 1000


@dataclass(frozen=True)
class HandoffModel:
    """KV handoff prefill -> store -> decode: latency + prompt bytes / bandwidth (per TP rank, ranks in
    parallel); transfers do not contend with each other."""

    bytes_per_token: float
    bandwidth_gb_s: float
    latency_ms: float

    def time_s(self, tokens: int) -> float:
        return self.latency_ms / 1000 + tokens * self.bytes_per_token / (self.bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class Profile:
    """Performance model of one node (all its accelerators, one TP group)."""

    name: str
    prefill: PrefillModel
    decode: DecodeModel
    handoff: HandoffModel
    max_batch_seqs: int = 64  # engine's cap on sequences decoding at once per node
    kv_blocks: int = 1024  # KV blocks per node
    block_size: int = 128
    description: str = ""
    fit: Mapping[str, Any] = field(default_factory=dict)  # provenance and fit residuals

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fit"] = dict(self.fit)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        d = dict(d)
        return cls(prefill=PrefillModel(**d.pop("prefill")), decode=DecodeModel(**d.pop("decode")),
                   handoff=HandoffModel(**d.pop("handoff")), **d)


def load_profile(path: str | Path) -> Profile:
    return Profile.from_dict(yaml.safe_load(Path(path).read_text()))


def save_profile(profile: Profile, path: str | Path) -> None:
    header = ("# Performance profile for `pdcluster simulate`; written by `pdcluster simulate --fit`.\n"
              "# Step-time models are documented in pdcluster/cluster/simulator.py.\n")
    Path(path).write_text(header + yaml.safe_dump(profile.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class Topology:
    """Either `colocated_nodes` nodes that prefill and decode, or prefill_nodes P + decode_nodes D."""

    prefill_nodes: int = 0
    decode_nodes: int = 0
    colocated_nodes: int = 0

    def __post_init__(self) -> None:
        disagg = self.prefill_nodes > 0 and self.decode_nodes > 0
        if (self.colocated_nodes > 0) == disagg or min(self.prefill_nodes, self.decode_nodes) < 0:
            raise ValueError(f"need colocated nodes, or prefill and decode nodes, not both: {self}")

    @property
    def label(self) -> str:
        if self.colocated_nodes:
            return f"{self.colocated_nodes} colocated"
        return f"{self.prefill_nodes}P{self.decode_nodes}D"


@dataclass(frozen=True)
class Workload:
    """Closed loop: `concurrency` clients, each sending `requests_per_client` requests back to back."""

    concurrency: int
    input_len: int = 128
    output_len: int = 512
    requests_per_client: int = 4
    start_stagger_s: float = 0.0  # client i starts at i x start_stagger_s


@dataclass
class NodeStats:
    role: str
    prefill_steps: int = 0
    decode_steps: int = 0
    busy_s: float = 0.0
    max_batch: int = 0


@dataclass(frozen=True)
class SimResult:
    stats: LevelStats
    traces: list[RequestTrace]
    nodes: dict[str, NodeStats]
    rejected: int


@dataclass(eq=False)
class _Seq:
    rid: str
    client: int
    prompt_len: int
    output_len: int
    start: float
    token_times: list[float] = field(default_factory=list)
    decode_node: _Node | None = None
    blocks: int = 0

    @property
    def ctx(self) -> int:
        return self.prompt_len + len(self.token_times)


@dataclass(eq=False)
class _Node:
    node_id: str
    role: str  # "prefill", "decode" or "both"
    stats: NodeStats
    free_blocks: int
    waiting: deque[_Seq] = field(default_factory=deque)  # to prefill
    joining: deque[_Seq] = field(default_factory=deque)  # KV arrived, joins the batch at the next step
    running: list[_Seq] = field(default_factory=list)  # decoding
    assigned: int = 0  # sequences routed here for decode and not finished
    prefilling: int = 0  # prompt tokens routed here for prefill and not yet computed
    in_use: int = 0  # blocks of the sequences this node's engine has started (prefill or decode)
    busy: bool = False

    def fits(self, seq: _Seq, capacity: int) -> bool:
        """The engine starts a sequence only when its blocks are free; until then it waits in the
        engine, as a real worker holds a request the router placed there without room."""
        return self.in_use + seq.blocks <= capacity

    def load(self, profile: Profile) -> WorkerLoad:
        return WorkerLoad(self.node_id, self.role, outstanding_prefill_tokens=self.prefilling,
                          running_seqs=self.assigned, free_blocks=max(0, self.free_blocks),
                          total_blocks=profile.kv_blocks, max_running_seqs=profile.max_batch_seqs)


class _Simulation:
    def __init__(self, profile: Profile, topology: Topology, workload: Workload,
                 admission: AdmissionConfig) -> None:
        self.p, self.w = profile, workload
        self.ac = AdmissionController(admission)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._n_events = 0
        blocks = profile.kv_blocks

        def nodes(prefix: str, n: int, role: str) -> list[_Node]:
            return [_Node(f"{prefix}{i}", role, NodeStats(role), blocks) for i in range(n)]
        self.colocated = topology.colocated_nodes > 0
        if self.colocated:
            self.prefill_nodes = self.decode_nodes = nodes("node", topology.colocated_nodes, "both")
        else:
            self.prefill_nodes = nodes("prefill", topology.prefill_nodes, "prefill")
            self.decode_nodes = nodes("decode", topology.decode_nodes, "decode")
        self.by_id = {n.node_id: n for n in self.prefill_nodes + self.decode_nodes}
        self.left = [workload.requests_per_client] * workload.concurrency
        self.queued: dict[str, _Seq] = {}  # admission queue's requests
        self.traces: list[RequestTrace] = []
        # request id -> "prefill/decode" worker ids, or "rejected: reason" (what the router would say)
        self.decisions: dict[str, str] = {}
        self.rejected = 0
        self._next_rid = 0

    def run(self) -> None:
        for c in range(self.w.concurrency):
            self._at(c * self.w.start_stagger_s, self._arrive, c)
        while self._events:
            self.now, _, fn, args = heapq.heappop(self._events)
            fn(*args)
        if self.queued or self.ac.in_flight:
            raise RuntimeError("simulation ended with requests still held: admission or placement leak")

    def _at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._n_events += 1
        heapq.heappush(self._events, (t, self._n_events, fn, args))

    # --- clients and admission -------------------------------------------------------------------
    def _arrive(self, client: int) -> None:
        if not self.left[client]:
            return
        self.left[client] -= 1
        seq = _Seq(f"r{self._next_rid}", client, self.w.input_len, self.w.output_len, self.now)
        self._next_rid += 1
        d = self.ac.admit(seq.rid, seq.prompt_len, seq.output_len, self.now)
        if d.verdict is Verdict.ADMIT:
            self._place(seq)
        elif d.verdict is Verdict.QUEUE:
            self.queued[seq.rid] = seq
        else:
            self._reject(seq, d.reason, d.retry_after_s)

    def _reject(self, seq: _Seq, reason: str, retry_after_s: float | None) -> None:
        self.rejected += 1
        self.decisions[seq.rid] = f"rejected: {reason}"
        self.traces.append(RequestTrace(seq.start, [], seq.prompt_len, ok=False,
                                        error=f"rejected: {reason}", end=self.now))
        self._at(self.now + (retry_after_s or 0.0), self._arrive, seq.client)

    def _place(self, seq: _Seq) -> None:
        needed = decode_blocks_needed(seq.prompt_len, seq.output_len, self.p.block_size)
        nodes = self.decode_nodes if self.colocated else self.prefill_nodes + self.decode_nodes
        # random prompts: no prefix to be affine to
        placed = place([n.load(self.p) for n in nodes], (), needed, self.p.block_size, self.colocated)
        if placed is None:  # a pool has no node at all: what the router answers "no_worker"
            self._release_slot(seq)
            self._reject(seq, "no_worker", 1.0)
            return
        dnode = self.by_id[placed.decode]
        pnode = dnode if placed.prefill is None else self.by_id[placed.prefill]
        self.decisions[seq.rid] = f"{placed.prefill}/{placed.decode}"
        dnode.free_blocks -= needed
        dnode.assigned += 1
        seq.blocks, seq.decode_node = needed, dnode
        pnode.prefilling += seq.prompt_len
        pnode.waiting.append(seq)
        self._wake(pnode)

    def _finish(self, seq: _Seq) -> None:
        node = seq.decode_node
        assert node is not None
        node.free_blocks += seq.blocks
        node.in_use -= seq.blocks
        node.assigned -= 1
        self.traces.append(RequestTrace(seq.start, seq.token_times, seq.prompt_len,
                                        output_tokens=len(seq.token_times), end=self.now))
        self._release_slot(seq)
        self._wake(node)  # blocks freed: a sequence waiting in this engine may start
        self._arrive(seq.client)

    def _release_slot(self, seq: _Seq) -> None:
        for rid in self.ac.release(seq.rid, self.now):
            self._place(self.queued.pop(rid))

    # --- nodes -----------------------------------------------------------------------------------
    def _wake(self, node: _Node) -> None:
        # Kick after the events at this instant: work arriving together (a closed-loop wave, KV of one
        # prefill batch) shares one step, as it would in a real engine's next scheduling round.
        self._at(self.now, self._kick, node)

    def _kick(self, node: _Node) -> None:
        """Start the node's next step if it is idle: prefill first (like vLLM without chunked prefill,
        a colocated node interrupts its decode batch to prefill newcomers), else one decode step."""
        if node.busy:
            return
        if node.waiting and node.role != "decode":
            room = self.p.max_batch_seqs - len(node.running) if node.role == "both" else len(node.waiting)
            batch: list[_Seq] = []
            tokens = 0
            colocated = node.role == "both"
            while node.waiting and len(batch) < room and (
                    not batch or tokens + node.waiting[0].prompt_len <= self.p.prefill.max_batch_tokens
            ) and (not colocated or node.fits(node.waiting[0], self.p.kv_blocks)):
                seq = node.waiting.popleft()
                batch.append(seq)
                tokens += seq.prompt_len
                if colocated:
                    node.in_use += seq.blocks
            if batch:
                dur = self.p.prefill.time_s(tokens)
                node.stats.prefill_steps += 1
                self._start(node, dur, self._prefill_done, node, batch, tokens, dur)
                return
        while (node.joining and len(node.running) < self.p.max_batch_seqs
               and node.fits(node.joining[0], self.p.kv_blocks)):
            seq = node.joining.popleft()
            node.in_use += seq.blocks
            node.running.append(seq)
        if node.running:
            batch_size = len(node.running)
            dur = self.p.decode.step_s(batch_size, sum(s.ctx for s in node.running))
            node.stats.decode_steps += 1
            node.stats.max_batch = max(node.stats.max_batch, batch_size)
            self._start(node, dur, self._decode_done, node)

    def _start(self, node: _Node, dur: float, fn: Callable[..., None], *args: Any) -> None:
        node.busy = True
        node.stats.busy_s += dur
        self._at(self.now + dur, fn, *args)

    def _prefill_done(self, node: _Node, batch: list[_Seq], tokens: int, dur: float) -> None:
        node.busy = False
        node.prefilling -= tokens
        self.ac.observe_prefill(tokens, dur, [s.rid for s in batch])
        for seq in batch:
            seq.token_times.append(self.now)  # the prefill samples the first token
            if len(seq.token_times) >= seq.output_len:
                self._finish(seq)
            elif self.colocated:
                node.running.append(seq)
            else:
                self._at(self.now + self.p.handoff.time_s(seq.prompt_len), self._kv_arrived, seq)
        self._kick(node)

    def _kv_arrived(self, seq: _Seq) -> None:
        node = seq.decode_node
        assert node is not None
        node.joining.append(seq)
        self._wake(node)

    def _decode_done(self, node: _Node) -> None:
        node.busy = False
        still: list[_Seq] = []
        done: list[_Seq] = []
        for seq in node.running:
            seq.token_times.append(self.now)
            (done if len(seq.token_times) >= seq.output_len else still).append(seq)
        node.running = still
        for seq in done:
            self._finish(seq)
        self._kick(node)


def simulate(profile: Profile, topology: Topology, workload: Workload,
             admission: AdmissionConfig | None = None, slo_ttft_s: float | None = None,
             slo_tpot_ms: float | None = None) -> SimResult:
    """Run one closed-loop level; admission defaults to slots for every client (nothing queues)."""
    if admission is None:
        admission = AdmissionConfig(max_concurrency=workload.concurrency, max_queue=0)
    sim = _Simulation(profile, topology, workload, admission)
    sim.run()
    stats = summarize(sim.traces, workload.concurrency, slo_ttft_s, slo_tpot_ms)
    return SimResult(stats, sim.traces, {n.node_id: n.stats for n in sim.by_id.values()}, sim.rejected)


def sweep_splits(profile: Profile, total_nodes: int, workload: Workload, slo_ttft_s: float | None = None,
                 slo_tpot_ms: float | None = None) -> list[tuple[Topology, LevelStats]]:
    """Every xPyD split of `total_nodes` plus all-colocated, best first: most goodput, then the highest
    per-request TPS."""
    topologies = [Topology(prefill_nodes=x, decode_nodes=total_nodes - x) for x in range(1, total_nodes)]
    topologies.append(Topology(colocated_nodes=total_nodes))
    rows = [(t, simulate(profile, t, workload, slo_ttft_s=slo_ttft_s, slo_tpot_ms=slo_tpot_ms).stats)
            for t in topologies]
    rows.sort(key=lambda r: (-_or_zero(r[1].goodput_rps), -_or_zero(r[1].tps)))
    return rows


def _or_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def assumptions(profile: Profile, workload: Workload, topology: Topology | None = None) -> list[str]:
    """The model's assumptions in words, for the CLI to print next to its numbers (both modes' when
    no topology is given)."""
    d, p, h = profile.decode, profile.prefill, profile.handoff
    lines = [
        f"profile {profile.name}: {profile.description}".rstrip(": "),
        f"decode step (ms) = {d.base_ms:.2f} + {d.batch_coef_ms:.3f} x batch^{d.batch_exponent:.2f} "
        f"+ {d.ctx_coef_ms:.2e} x context tokens in the batch; each decode node runs its own batch "
        f"(at most {profile.max_batch_seqs} sequences)",
        f"prefill step (ms) = {p.base_ms:.1f} + {p.per_token_ms:.4f} x prompt tokens, waiting prompts "
        f"batched up to {p.max_batch_tokens} tokens; the prefill samples the first token",
        f"closed loop: {workload.concurrency} clients x {workload.requests_per_client} requests, "
        f"{workload.input_len} tokens in, exactly {workload.output_len} out, no think time, no prefix reuse",
    ]
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


# --- fitting --------------------------------------------------------------------------------------

def read_measurements(path: str | Path) -> list[dict[str, float]]:
    """Rows of an evalscope-style CSV (header lines start with '#'): concurrency, ttft_s, tpot_ms, ..."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(lines)]


def _lstsq_nonneg2(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y ~ a + b x with a, b >= 0 (negative costs are not physical)."""
    sol, *_ = np.linalg.lstsq(np.c_[np.ones_like(x), x] * weights[:, None], y * weights, rcond=None)
    a, b = float(sol[0]), float(sol[1])
    if b < 0:
        a, b = float(np.average(y, weights=weights ** 2)), 0.0
    elif a < 0:
        a, b = 0.0, float(np.sum(weights ** 2 * x * y) / np.sum(weights ** 2 * x * x))
    return a, b


def fit_profile(rows: Sequence[Mapping[str, float]], input_len: int, output_len: int, *,
                name: str = "fitted", description: str = "", source: str = "",
                kv_bytes_per_token: float, hbm_gb_s: float, handoff: HandoffModel,
                batch_exponent: float | None = None, max_batch_seqs: int = 64, kv_blocks: int = 1024,
                block_size: int = 128, max_batch_tokens: int = 16384) -> Profile:
    """Fit step-time models to colocated single-node closed-loop measurements (one row per concurrency:
    `concurrency`, `ttft_s`, `tpot_ms`) with fixed `input_len`/`output_len`.

    In such a run every wave of `c` requests is prefilled in one batch and decoded together, so
    TTFT(c) = prefill(c x input_len) and TPOT(c) = mean decode step at batch c, whose context averages
    c x (input_len + output_len / 2). The KV-read coefficient comes from the hardware
    (kv_bytes_per_token / hbm_gb_s); base and batch coefficient are least squares on relative error;
    the batch exponent is searched on a grid when there are >= 3 rows and not given, else 0.5.
    """
    if len(rows) < 2:
        raise ValueError("need measurements at >= 2 concurrencies")
    c = np.array([r["concurrency"] for r in rows], dtype=float)
    tpot = np.array([r["tpot_ms"] for r in rows], dtype=float)
    ttft_ms = np.array([r["ttft_s"] for r in rows], dtype=float) * 1000
    ctx_coef = kv_bytes_per_token / (hbm_gb_s * 1e9) * 1000  # ms per context token read
    y = tpot - ctx_coef * c * (input_len + output_len / 2)
    w = 1 / tpot

    def fit_at(beta: float) -> tuple[float, float, float]:
        a, b = _lstsq_nonneg2(c ** beta, y, w)
        return float(np.sum((w * (a + b * c ** beta - y)) ** 2)), a, b

    fitted = batch_exponent is None and len(rows) >= 3
    if fitted:
        beta = min(np.round(np.arange(0.2, 1.2001, 0.01), 2), key=lambda bt: fit_at(float(bt))[0])
    else:
        beta = DEFAULT_BATCH_EXPONENT if batch_exponent is None else batch_exponent
    _, a, b = fit_at(float(beta))
    pa, pb = _lstsq_nonneg2(c * input_len, ttft_ms, 1 / ttft_ms)
    decode = DecodeModel(round(a, 4), round(b, 4), float(beta), float(f"{ctx_coef:.4g}"))
    prefill = PrefillModel(round(pa, 3), round(pb, 6), max_batch_tokens)
    tpot_fit = [decode.step_s(int(ci), 0) * 1000 + ctx_coef * ci * (input_len + output_len / 2) for ci in c]
    fit_info = {
        "source": source, "input_len": input_len, "output_len": output_len,
        "concurrencies": [int(ci) for ci in c],
        "batch_exponent": "least squares" if fitted else "given" if batch_exponent is not None else "prior",
        "kv_read": f"{kv_bytes_per_token:.0f} B/token / {hbm_gb_s:.0f} GB/s",
        "assumed_not_fitted": "decode.ctx_coef_ms, handoff, max_batch_seqs, kv_blocks, block_size",
        "tpot_rel_err": {int(ci): round(float(f / m - 1), 4) for ci, f, m in zip(c, tpot_fit, tpot)},
        "ttft_rel_err": {int(ci): round(float(prefill.time_s(int(ci) * input_len) * 1000 / m - 1), 4)
                         for ci, m in zip(c, ttft_ms)},
    }
    return Profile(name, prefill, decode, handoff, max_batch_seqs, kv_blocks, block_size, description, fit_info)


def simulate_levels(profile: Profile, topology: Topology, concurrencies: Iterable[int], input_len: int,
                    output_len: int, requests_per_client: int = 4, slo_ttft_s: float | None = None,
                    slo_tpot_ms: float | None = None, start_stagger_s: float = 0.0) -> list[LevelStats]:
    """One closed-loop simulation per concurrency (the bench sweep, simulated)."""
    return [simulate(profile, topology, Workload(cc, input_len, output_len, requests_per_client, start_stagger_s),
                     slo_ttft_s=slo_ttft_s, slo_tpot_ms=slo_tpot_ms).stats for cc in concurrencies]
