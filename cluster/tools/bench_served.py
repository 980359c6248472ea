"""Served performance against the offline engine it serves, in one run: the engine in process (no Ray)
at each batch size, then the colocated and the PD deployments (and any --peer servers) at the same
concurrencies, with served throughput and TPOT as ratios of the offline engine's and the goals beside.

    python -m pdcluster.cluster.tools.bench_served [--concurrency 1 8 32] [--peer llama.cpp=http://127.0.0.1:8100]
        [--engine-core process thread] [--engine-threads shared split] [--matmul-activations float32]
        [--stream-interval 1 8] [--http-proxy haproxy serve]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..policy.engine_threads import EXPAND_FROM_SEQS, expand_from_seqs
from .bench_client import BenchConfig, Endpoint, quiet_http_logs, render_markdown, write_report
from .bench_cluster import local_ports, local_spec, prompt_counter, sweep_deployments
from .bench_engine import generate_batch, random_prompts
from .perf_metrics import LevelStats, ratio

# The goals the served path is held to (issue #21): at the lowest concurrency a request's TPOT within
# 1.15x of the offline engine's decode step at batch 1; at the highest, throughput at least 0.9x the
# offline engine's with as many requests in one batch.
TPOT_GOAL = 1.15
THROUGHPUT_GOAL = 0.9


@dataclass(frozen=True)
class OfflineLevel:
    """The engine in process with `batch` requests added at once: the median gap between the first
    request's tokens (one decode step once prompts are in) and output tokens/s over the whole run."""

    batch: int
    step_ms: float
    throughput_tok_s: float


def measure_offline(engine, concurrency: Sequence[int], input_len: int, output_len: int,
                    seed: int = 0, rounds: int = 2) -> list[OfflineLevel]:
    """Each level `rounds` times, keeping its best step and throughput: the baseline the served
    figures are divided by is the engine at its fastest, not a round the VM slowed."""
    vocab = engine.hf_config["vocab_size"]
    generate_batch(engine, random_prompts(1, 16, vocab, seed), 4)  # first-call costs out of the way
    levels = []
    for c in concurrency:
        steps, rates = [], []
        for r in range(rounds):
            # fresh prompts per level and round: the prefix cache must not serve one from another
            prompts = random_prompts(c, input_len, vocab, seed + 1000 * (r + 1) + c)
            wall, times = generate_batch(engine, prompts, output_len)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            steps.append(1000 * statistics.median(gaps) if gaps else math.nan)
            rates.append(c * output_len / wall)
        levels.append(OfflineLevel(c, min(steps), max(rates)))
    return levels


def _fmt(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _goal(value: float, limit: float, at_most: bool) -> str:
    if math.isnan(value):
        return "-"
    met = value <= limit if at_most else value >= limit
    return f"{'met' if met else 'missed'} ({'<=' if at_most else '>='} {limit:g}x)"


def format_offline(levels: Sequence[OfflineLevel]) -> str:
    lines = ["| batch | decode step (ms) | throughput (tok/s) |", "|---|---|---|"]
    lines += [f"| {lv.batch} | {_fmt(lv.step_ms, 1)} | {_fmt(lv.throughput_tok_s, 1)} |" for lv in levels]
    return "\n".join(lines)


def format_vs_offline(offline: Sequence[OfflineLevel], served: Mapping[str, Sequence[LevelStats]]) -> str:
    """One row per served endpoint and concurrency: mean TPOT over the offline decode step, and
    throughput over the offline throughput, both at the same batch, with the goal where it applies
    (TPOT at the lowest concurrency, throughput at the highest)."""
    by_batch = {lv.batch: lv for lv in offline}
    lines = [("| served | conc. | TTFT p50 (s) | TPOT mean (ms) | TPOT / offline step | "
             "throughput (tok/s) | throughput / offline | goal |"), "|---|---|---|---|---|---|---|---|"]
    for name, levels in served.items():
        if not levels:
            continue
        lowest, highest = min(lv.concurrency for lv in levels), max(lv.concurrency for lv in levels)
        for lv in levels:
            off = by_batch.get(lv.concurrency)
            tpot_x = ratio(lv.tpot_mean_ms, off.step_ms) if off else math.nan
            tput_x = ratio(lv.throughput_tok_s, off.throughput_tok_s) if off else math.nan
            goals = []
            if lv.concurrency == lowest:
                goals.append("TPOT " + _goal(tpot_x, TPOT_GOAL, at_most=True))
            if lv.concurrency == highest:
                goals.append("throughput " + _goal(tput_x, THROUGHPUT_GOAL, at_most=False))
            lines.append(f"| {name} | {lv.concurrency} | {_fmt(lv.ttft_p50_s, 3)} | {_fmt(lv.tpot_mean_ms, 1)} "
                         f"| {_fmt(tpot_x, 2)} | {_fmt(lv.throughput_tok_s, 1)} | {_fmt(tput_x, 2)} "
                         f"| {'; '.join(goals)} |")
    return "\n".join(lines)


def format_pd_share(share: int, offline_share: Sequence[OfflineLevel],
                    served: Mapping[str, Sequence[LevelStats]],
                    wide: Collection[str] = ()) -> str:
    """PD deployments at the concurrencies whose decode steps keep the decode engine's share of the
    cores, against the offline engine on that many threads: what serving adds to the engine it runs.
    `wide`: deployments whose steps of any size take idle cores (a long stream interval), left out."""
    by_batch = {lv.batch: lv for lv in offline_share}
    lines = [f"A PD decode engine steps fewer than {EXPAND_FROM_SEQS} sequences on its share of the cores "
             f"({share} thread{'s' if share > 1 else ''} here); the offline engine on as many:", "",
             f"| served | conc. | TPOT mean (ms) | offline step, {share} thr. (ms) | TPOT / that step |",
             "|---|---|---|---|---|"]
    for name, levels in served.items():
        if not name.startswith("pd") or name in wide:
            continue
        for lv in levels:
            off = by_batch.get(lv.concurrency)
            if off is not None:
                lines.append(f"| {name} | {lv.concurrency} | {_fmt(lv.tpot_mean_ms, 1)} "
                             f"| {_fmt(off.step_ms, 1)} | {_fmt(ratio(lv.tpot_mean_ms, off.step_ms), 2)} |")
    return "\n".join(lines)


def format_vs_peers(ours: Mapping[str, Sequence[LevelStats]], peers: Mapping[str, Sequence[LevelStats]]) -> str:
    """Each of our deployments against each peer at the same concurrency: throughput ours/peer and
    TPOT peer/ours, so above 1 is ahead on both."""
    lines = ["| ours | peer | conc. | throughput ours/peer | TPOT peer/ours | |", "|---|---|---|---|---|---|"]
    for name, levels in ours.items():
        for peer, peer_levels in peers.items():
            at = {lv.concurrency: lv for lv in peer_levels}
            for lv in levels:
                p = at.get(lv.concurrency)
                if p is None:
                    continue
                tput, tpot = ratio(lv.throughput_tok_s, p.throughput_tok_s), ratio(p.tpot_mean_ms, lv.tpot_mean_ms)
                verdict = ("-" if math.isnan(tput) or math.isnan(tpot) else
                           "ahead" if tput >= 1 and tpot >= 1 else
                           "behind" if tput < 1 and tpot < 1 else
                           f"{'ahead' if tput >= 1 else 'behind'} on throughput, "
                           f"{'ahead' if tpot >= 1 else 'behind'} on TPOT")
                lines.append(f"| {name} | {peer} | {lv.concurrency} | {_fmt(tput, 2)} | {_fmt(tpot, 2)} "
                             f"| {verdict} |")
    return "\n".join(lines)


def render_report(cfg: BenchConfig, offline: Sequence[OfflineLevel], results: Mapping[str, Sequence[LevelStats]],
                  peer_names: Sequence[str], share: int = 0,
                  offline_share: Sequence[OfflineLevel] = (), wide: Collection[str] = ()) -> str:
    ours = {k: v for k, v in results.items() if k not in peer_names}
    peers = {k: v for k, v in results.items() if k in peer_names}
    parts = [f"## Served vs offline engine: {cfg.model}, {cfg.input_len} in / {cfg.output_len} out, greedy",
             "### Offline engine (in process, no Ray)", format_offline(offline),
             "### Served, as ratios of the offline engine", format_vs_offline(offline, ours)]
    if offline_share and any(name.startswith("pd") for name in ours):
        parts += ["### PD against the offline engine on the decode engine's threads",
                  format_pd_share(share, offline_share, ours, wide)]
    if peers:
        parts += ["### Against peers", format_vs_peers(ours, peers)]
    parts.append(render_markdown(cfg, dict(results)))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests-per-level", type=int, default=None,
                    help="default: one wave (as many as the concurrency), at least 4")
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--peer", metavar="NAME=URL", action="append", default=[],
                    help="another OpenAI-compatible server swept beside the colocated deployment (repeatable)")
    ap.add_argument("--deployments", nargs="+", choices=["colocated", "pd"], default=["colocated", "pd"])
    ap.add_argument("--engine-core", nargs="+", choices=["process", "thread"], default=["process"],
                    help="engine.core of the deployments; with both, each deployment runs with each "
                         "(named e.g. colocated-thread), the engine in its own process against the "
                         "engine on a thread of the worker actor")
    ap.add_argument("--engine-threads", nargs="+", choices=["shared", "split"], default=["shared"],
                    help="engine.threads of the deployments: unset (shared: decode steps take the "
                         "cores an idle prefill engine leaves, the default) or set to the cores split "
                         "among the workers; with both, each deployment runs with each (e.g. pd-split)")
    ap.add_argument("--matmul-activations", choices=["auto", "float32", "int16", "int8"], default="auto",
                    help="engine.matmul_activations of the offline engine and every deployment")
    ap.add_argument("--stream-interval", nargs="+", type=int, default=[1],
                    help="engine.stream_interval of the deployments (a stream's tokens leave the "
                         "engine this many at a time); with several, each deployment runs with each "
                         "(e.g. pd-si8)")
    ap.add_argument("--http-proxy", nargs="+", choices=["serve", "haproxy"], default=["serve"],
                    help="serve.http_proxy of the deployments; with both, each deployment runs with "
                         "each (e.g. pd-serve; Ray restarts between them: Serve reads it at start)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/served"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_http_logs()
    try:
        peers = [Endpoint.parse(text) for text in args.peer]
    except ValueError as e:
        ap.error(f"--peer: {e}")
    if len({p.name for p in peers} | set(args.deployments)) < len(peers) + len(args.deployments):
        ap.error("--peer names must differ from each other and from the deployments")

    ports = local_ports()
    cores = list(dict.fromkeys(args.engine_core))
    threads = list(dict.fromkeys(args.engine_threads))
    intervals = list(dict.fromkeys(args.stream_interval))
    proxies = list(dict.fromkeys(args.http_proxy))
    if min(intervals) < 1:
        ap.error("--stream-interval must be at least 1")
    specs = {"-".join([name] + ([core] if len(cores) > 1 else []) + ([way] if len(threads) > 1 else [])
                      + ([f"si{n}"] if len(intervals) > 1 else []) + ([proxy] if len(proxies) > 1 else [])):
             local_spec(name == "colocated", args.kv_blocks, ports, core, way, args.matmul_activations, n,
                        proxy)
             for proxy in proxies for name in args.deployments for core in cores for way in threads
             for n in intervals}
    first = next(iter(specs.values()))
    cfg = BenchConfig(model=first.model.served_name, input_len=args.input_len, output_len=args.output_len,
                      concurrency=tuple(args.concurrency), requests_per_level=args.requests_per_level,
                      waves=1, min_requests=4, warmup_requests=2)

    from ...engine.llm_engine import LLMEngine
    t0 = time.perf_counter()
    # the colocated deployment's engine, with all of this machine's cores, in this process
    engine = LLMEngine(local_spec(True, args.kv_blocks, ports,
                                  matmul_activations=args.matmul_activations).engine_config())
    offline = measure_offline(engine, args.concurrency, args.input_len, args.output_len)
    # a PD decode engine's share of this machine (its steps of few sequences keep it), where it is less
    share, offline_share = max(1, (os.cpu_count() or 2) // 2), []
    small = [c for c in args.concurrency if c < EXPAND_FROM_SEQS]
    if "pd" in args.deployments and small and share < engine.threads:
        threads = engine.threads
        engine.set_threads(share)
        offline_share = measure_offline(engine, small, args.input_len, args.output_len, seed=1)
        engine.set_threads(threads)
    activations = engine.matmul_activations
    del engine
    gc.collect()
    print(f"offline engine measured in {time.perf_counter() - t0:.0f} s", flush=True)

    results, endpoints = sweep_deployments(cfg, specs, prompt_counter(first), peers, progress=False)
    wide = [name for name, spec in specs.items() if expand_from_seqs(spec.engine.stream_interval) <= 1]
    report = (render_report(cfg, offline, results, [p.name for p in peers], share, offline_share, wide)
              + f"\n\nengine.matmul_activations: {args.matmul_activations} ({activations} here; offline "
                "and served)")
    print(report)
    for path in write_report(args.out, cfg, endpoints, results):
        print(f"wrote {path}")
    (args.out / "offline.json").write_text(json.dumps(
        {"offline": [asdict(lv) for lv in offline],
         "offline_on_share": {"threads": share, "levels": [asdict(lv) for lv in offline_share]}}, indent=2))
    (args.out / "served.md").write_text(report)
    print(f"wrote {args.out / 'offline.json'}\nwrote {args.out / 'served.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
