"""`pdcluster simulate`: capacity planning with the discrete-event simulator, and fitting its profile.

Answers "what per-request tokens/s does xPyD give at concurrency C" and ranks xPyD splits of N nodes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..tools.perf_metrics import format_table, largest_concurrency_meeting_tps, levels_to_json
from ..tools.simulator import (
    HandoffModel,
    Profile,
    Topology,
    Workload,
    assumptions,
    fit_profile,
    load_profile,
    read_measurements,
    save_profile,
    simulate_levels,
    sweep_splits,
)

# DeepSeek-V3/R1 MLA cache per token: 61 layers x (512 latent + 64 rope) x 2 bytes (bf16); every TP rank
# holds (and reads, and receives in a handoff) the whole latent.
DSR1_KV_BYTES_PER_TOKEN = 61 * (512 + 64) * 2
# Ascend 910B: ~1.6 TB/s HBM per card; one 200 Gb/s RoCE port per card = 25 GB/s per TP rank.
ASCEND_910B_HBM_GB_S = 1600.0
ASCEND_910B_ROCE_GB_S = 25.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="simulate xPyD / colocated serving from a fitted profile",
                              description=__doc__)
    p.add_argument("--profile", type=Path, help="profile YAML (e.g. deploy/profiles/910b_dsr1_awq_tp8.yaml)")
    p.add_argument("--prefill-nodes", type=int, default=0)
    p.add_argument("--decode-nodes", type=int, default=0)
    p.add_argument("--colocated-nodes", type=int, default=0,
                   help="nodes doing both prefill and decode (default 1 if no P/D nodes are given)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--stagger-s", type=float, default=0.0,
                   help="client i starts at i x this (0: all at once, like evalscope; > 0 desynchronizes "
                        "requests, so colocated nodes see prefills interrupt decoding)")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (goodput)")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in ms (goodput); default 1000/--min-tps")
    p.add_argument("--min-tps", type=float, help="report the largest concurrency with per-request TPS >= this")
    p.add_argument("--sweep-splits", type=int, metavar="N",
                   help="rank every xPyD split of N nodes (and N colocated) by goodput at each concurrency")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    fit = p.add_argument_group("fitting a profile from colocated single-node measurements")
    fit.add_argument("--fit", type=Path, metavar="CSV", help="evalscope-style CSV (concurrency,ttft_s,tpot_ms,...)")
    fit.add_argument("--write-profile", type=Path, help="where to write the fitted profile YAML")
    fit.add_argument("--fit-concurrency", type=int, nargs="+", help="use only these rows (default: all)")
    fit.add_argument("--name", help="profile name (default: the output file's stem)")
    fit.add_argument("--description", default="")
    fit.add_argument("--kv-bytes-per-token", type=float, default=DSR1_KV_BYTES_PER_TOKEN,
                     help="KV bytes per token per TP rank (default: DeepSeek-R1 MLA, bf16)")
    fit.add_argument("--hbm-gb-s", type=float, default=ASCEND_910B_HBM_GB_S, help="HBM bandwidth per card")
    fit.add_argument("--handoff-gb-s", type=float, default=ASCEND_910B_ROCE_GB_S,
                     help="KV transfer bandwidth per TP rank")
    fit.add_argument("--handoff-latency-ms", type=float, default=2.0, help="store put + get round trips")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.fit:
        return _fit(args)
    if args.profile is None:
        print("simulate: --profile is required (or --fit CSV --write-profile PATH)", file=sys.stderr)
        return 2
    profile = load_profile(args.profile)
    slo_tpot = args.slo_tpot if args.slo_tpot is not None else (1000 / args.min_tps if args.min_tps else None)
    if args.sweep_splits:
        return _sweep(args, profile, slo_tpot)
    if args.prefill_nodes or args.decode_nodes:
        topology = Topology(args.prefill_nodes, args.decode_nodes, args.colocated_nodes)
    else:
        topology = Topology(colocated_nodes=args.colocated_nodes or 1)
    print("Assumptions:")
    workload = Workload(max(args.concurrency), args.input_len, args.output_len, args.requests_per_client,
                        args.stagger_s)
    for line in assumptions(profile, workload, topology):
        print(f"  - {line}")
    levels = simulate_levels(profile, topology, args.concurrency, args.input_len, args.output_len,
                             args.requests_per_client, args.slo_ttft, slo_tpot, args.stagger_s)
    print()
    print(format_table(levels, title=f"{topology.label}, {args.input_len} in / {args.output_len} out (simulated)"))
    if args.min_tps:
        best = largest_concurrency_meeting_tps(levels, args.min_tps)
        print(f"\nLargest simulated concurrency with per-request TPS >= {args.min_tps:g}: {best}")
    if args.json:
        args.json.write_text(json.dumps({"topology": topology.label, "profile": profile.name,
                                         "levels": levels_to_json(levels)}, indent=2))
    return 0


def _sweep(args: argparse.Namespace, profile: Profile, slo_tpot: float | None) -> int:
    out = {}
    for conc in args.concurrency:
        workload = Workload(conc, args.input_len, args.output_len, args.requests_per_client, args.stagger_s)
        rows = sweep_splits(profile, args.sweep_splits, workload, args.slo_ttft, slo_tpot)
        slo = f"TTFT <= {args.slo_ttft} s, TPOT <= {slo_tpot} ms" if args.slo_ttft or slo_tpot else "no SLO"
        print(format_table([s for _, s in rows], labels=[t.label for t, _ in rows], label_header="Split",
                           title=f"{args.sweep_splits} nodes, concurrency {conc}, ranked by goodput ({slo})"))
        print()
        out[conc] = [{"topology": t.label, **s.to_dict()} for t, s in rows]
    print("Assumptions:")
    for line in assumptions(profile, workload):
        print(f"  - {line}")
    if args.json:
        args.json.write_text(json.dumps({"profile": profile.name, "sweep": out}, indent=2))
    return 0


def _fit(args: argparse.Namespace) -> int:
    if args.write_profile is None:
        print("simulate --fit needs --write-profile PATH", file=sys.stderr)
        return 2
    rows = read_measurements(args.fit)
    if args.fit_concurrency:
        rows = [r for r in rows if int(r["concurrency"]) in args.fit_concurrency]
    profile = fit_profile(
        rows, args.input_len, args.output_len, name=args.name or args.write_profile.stem,
        description=args.description, source=args.fit.name,
        kv_bytes_per_token=args.kv_bytes_per_token, hbm_gb_s=args.hbm_gb_s,
        handoff=HandoffModel(args.kv_bytes_per_token, args.handoff_gb_s, args.handoff_latency_ms))
    save_profile(profile, args.write_profile)
    print(f"wrote {args.write_profile}")
    print(json.dumps(profile.to_dict(), indent=2))
    return 0
