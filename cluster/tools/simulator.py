"""Discrete-event simulator of a PD-disaggregated (xPyD) or colocated cluster, for capacity planning.

It drives the real AdmissionController and placement with simulated nodes whose step times come from a
planner profile (cluster/tools/planner), and reports the same metrics as the benchmark.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..policy.admission import AdmissionConfig, AdmissionController, Verdict
from ..policy.placement import WorkerLoad, decode_blocks_needed, place
from .perf_metrics import LevelStats, RequestTrace, summarize
from .planner.decode import DecodeCost
from .planner.profile import Profile


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
    credit: float = 0.0  # speculative decoding: accepted tokens owed but not yet emitted (fraction)

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
        if self.colocated and profile.decode_parallel == "ep":
            raise ValueError("an expert-parallel decode pool needs disaggregated decode nodes, not colocated")
        self.layout = profile.layout(topology.decode_nodes or topology.colocated_nodes)
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
                dur = self.p.prefill.time_s([s.prompt_len for s in batch], self.p.model, self.p.hardware)
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
            cost = self._decode_cost(node)
            node.stats.decode_steps += 1
            node.stats.max_batch = max(node.stats.max_batch, batch_size)
            self._start(node, cost.total_ms / 1000, self._decode_done, node, cost.tokens_per_seq)

    def _decode_cost(self, node: _Node) -> DecodeCost:
        """A node's next decode step. TP replica: the node's batch. EP pool: one attention group's share
        of the node's batch, with the experts seeing every decode node's sequences (the pool steps
        together; the simulation times each node's step with the pool's current load)."""
        seqs, ctx = len(node.running), sum(s.ctx for s in node.running)
        p, layout = self.p, self.layout
        if layout.parallel == "tp":
            return p.decode.cost(p.model, p.hardware, layout, seqs, ctx, None, p.speculative)
        group = math.ceil(seqs / max(1, p.hardware.chips_per_node // layout.attn_tp))
        # the other nodes' sequences that joined at this instant count already: they step together
        pool = seqs + sum(len(n.running) + len(n.joining) for n in self.decode_nodes if n is not node)
        return p.decode.cost(p.model, p.hardware, layout, group, round(ctx * group / seqs), pool, p.speculative)

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

    def _decode_done(self, node: _Node, tokens_per_seq: float) -> None:
        """Each sequence gains tokens_per_seq tokens on average (1 without speculation); the fraction
        carries over to its next step."""
        node.busy = False
        still: list[_Seq] = []
        done: list[_Seq] = []
        for seq in node.running:
            seq.credit += tokens_per_seq
            gained = max(1, int(seq.credit + 1e-9))
            seq.credit -= gained
            seq.token_times.extend([self.now] * min(gained, seq.output_len - len(seq.token_times)))
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


def sweep_splits(profiles: Iterable[Profile], total_nodes: int, workload: Workload,
                 slo_ttft_s: float | None = None, slo_tpot_ms: float | None = None
                 ) -> list[tuple[Topology, Profile, LevelStats]]:
    """Every xPyD split of `total_nodes` (plus all-colocated for TP-replica decode) under each decode
    choice in `profiles`, best first: most goodput, then the highest per-request TPS."""
    rows = []
    for profile in profiles:
        topologies = [Topology(prefill_nodes=x, decode_nodes=total_nodes - x) for x in range(1, total_nodes)]
        if profile.decode_parallel == "tp":
            topologies.append(Topology(colocated_nodes=total_nodes))
        rows += [(t, profile, simulate(profile, t, workload, slo_ttft_s=slo_ttft_s, slo_tpot_ms=slo_tpot_ms).stats)
                 for t in topologies]
    rows.sort(key=lambda r: (-_or_zero(r[2].goodput_rps), -_or_zero(r[2].tps)))
    return rows


def _or_zero(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def simulate_levels(profile: Profile, topology: Topology, concurrencies: Iterable[int], input_len: int,
                    output_len: int, requests_per_client: int = 4, slo_ttft_s: float | None = None,
                    slo_tpot_ms: float | None = None, start_stagger_s: float = 0.0) -> list[LevelStats]:
    """One closed-loop simulation per concurrency (the bench sweep, simulated)."""
    return [simulate(profile, topology, Workload(cc, input_len, output_len, requests_per_client, start_stagger_s),
                     slo_ttft_s=slo_ttft_s, slo_tpot_ms=slo_tpot_ms).stats for cc in concurrencies]
