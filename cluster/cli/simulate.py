"""`pdcluster simulate`: capacity planning with the discrete-event simulator, and fitting its profile.

Answers "what per-request tokens/s does xPyD give at concurrency C" under each decode choice (TP replicas
or an expert-parallel pool, with or without MTP speculation), and ranks xPyD splits of N nodes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..tools.perf_metrics import format_table, largest_concurrency_meeting_tps, levels_to_json
from ..tools.planner.decode import DECODE_PARALLEL, Speculative
from ..tools.planner.fit import MeasurementError, fit_profile, migrate_format1, read_measurements
from ..tools.planner.hardware import ASCEND_910B1, DEEPSEEK_R1
from ..tools.planner.profile import (
    Format1Profile,
    HandoffModel,
    Profile,
    ProfileError,
    load_profile,
    save_profile,
)
from ..tools.planner.report import (
    SGLANG_910C_TPOT_MS,
    assumptions,
    decode_choices,
    format_errors,
    format_plan,
    long_context_rows,
    plan_table,
    predict_rows,
    sglang_910c_check,
)
from ..tools.simulator import Topology, Workload, simulate_levels, sweep_splits


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
                   help="rank every xPyD split of N nodes (and N colocated) under TP-replica and EP decode, "
                        "with and without --speculative, by goodput at each concurrency")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    dec = p.add_argument_group("decode choices (default: the profile's)")
    dec.add_argument("--decode-parallel", choices=DECODE_PARALLEL,
                     help="tp: each decode node is a TP replica; ep: the decode nodes form one expert-parallel pool")
    dec.add_argument("--attn-tp", type=int, help="EP pool: chips per data-parallel attention group (default: a node)")
    dec.add_argument("--speculative", metavar="mtp:K", help="MTP speculative decoding with K draft tokens")
    dec.add_argument("--acceptance", metavar="A[,A2,...]",
                     help="draft acceptance per position (one value for all), required with --speculative")
    dec.add_argument("--plan", action="store_true",
                     help="table of per-request TPS at --concurrency for {tp, ep} x {no MTP, MTP k=1..3 at "
                          "acceptance 0.6/0.75/0.9} on the given P/D nodes, and the largest concurrency "
                          "at >= --min-tps (default 30) for each")
    dec.add_argument("--plan-input-lens", type=int, nargs="+", default=[128, 1024])
    val = p.add_argument_group("validating a profile")
    val.add_argument("--validate", type=Path, nargs="*", metavar="CSV",
                     help="compare the profile with these measurements (input length: the rows' input_len "
                          "column, else --input-len) and with the vendor's public long-context points")
    fit = p.add_argument_group("fitting a profile from colocated single-node measurements")
    fit.add_argument("--fit", type=Path, metavar="CSV", help="evalscope-style CSV (concurrency,ttft_s,tpot_ms,...)")
    fit.add_argument("--write-profile", type=Path, help="where to write the fitted profile YAML")
    fit.add_argument("--fit-concurrency", type=int, nargs="+", help="use only these rows (default: all)")
    fit.add_argument("--name", help="profile name (default: the output file's stem)")
    fit.add_argument("--description", default="")
    fit.add_argument("--mfu", type=float, default=0.3, help="assumed fraction of peak TFLOP/s prefill matmuls reach")
    fit.add_argument("--kv-efficiency", type=float, default=1.0,
                     help="assumed fraction of HBM bandwidth KV-cache reads reach")
    fit.add_argument("--handoff-latency-ms", type=float, default=2.0, help="store put + get round trips")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.fit:
            return _fit(args)
        if args.profile is None:
            print("simulate: --profile is required (or --fit CSV --write-profile PATH)", file=sys.stderr)
            return 2
        profile = _decode_choice(args, _load(args.profile))
        if args.validate is not None:
            return _validate(args, profile)
        slo_tpot = args.slo_tpot if args.slo_tpot is not None else (1000 / args.min_tps if args.min_tps else None)
        if args.sweep_splits:
            return _sweep(args, profile, slo_tpot)
        topology = _topology(args)
        if args.plan:
            return _plan(args, profile, topology)
        return _levels(args, profile, topology, slo_tpot)
    except (ProfileError, MeasurementError, ValueError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2


def _load(path: Path) -> Profile:
    """The profile at `path`; a format-1 file is migrated in memory, with a note saying how."""
    try:
        return load_profile(path)
    except Format1Profile as exc:
        profile = migrate_format1(exc.data)
        print(f"note: {path} is a format-1 profile; migrated in memory by fitting format 2 to its own curves "
              f"(hardware {profile.hardware.name}, model {profile.model.name} assumed). To keep it: pdcluster "
              f"simulate --fit CSV --write-profile {path}", file=sys.stderr)
        return profile


def _decode_choice(args: argparse.Namespace, profile: Profile) -> Profile:
    spec: Speculative | None | bool = False
    if args.speculative:
        kind, _, k = args.speculative.partition(":")
        if kind != "mtp" or not k.isdigit():
            raise ValueError(f"--speculative {args.speculative!r}: expected mtp:K, e.g. mtp:2")
        if not args.acceptance:
            raise ValueError("--speculative needs --acceptance (it depends on the model and the prompts)")
        spec = Speculative(int(k), tuple(float(a) for a in args.acceptance.split(",")))
    elif args.acceptance:
        raise ValueError("--acceptance needs --speculative mtp:K")
    return profile.with_decode(args.decode_parallel, spec, args.attn_tp)


def _topology(args: argparse.Namespace) -> Topology:
    if args.prefill_nodes or args.decode_nodes:
        return Topology(args.prefill_nodes, args.decode_nodes, args.colocated_nodes)
    return Topology(colocated_nodes=args.colocated_nodes or 1)


def _levels(args: argparse.Namespace, profile: Profile, topology: Topology, slo_tpot: float | None) -> int:
    print("Assumptions:")
    workload = Workload(max(args.concurrency), args.input_len, args.output_len, args.requests_per_client,
                        args.stagger_s)
    for line in assumptions(profile, workload, topology):
        print(f"  - {line}")
    levels = simulate_levels(profile, topology, args.concurrency, args.input_len, args.output_len,
                             args.requests_per_client, args.slo_ttft, slo_tpot, args.stagger_s)
    print()
    print(format_table(levels, title=f"{topology.label}, {profile.decode_label}, {args.input_len} in / "
                                     f"{args.output_len} out (simulated)"))
    if args.min_tps:
        best = largest_concurrency_meeting_tps(levels, args.min_tps)
        print(f"\nLargest simulated concurrency with per-request TPS >= {args.min_tps:g}: {best}")
    if args.json:
        args.json.write_text(json.dumps({"topology": topology.label, "profile": profile.name,
                                         "decode": profile.decode_label, "levels": levels_to_json(levels)},
                                        indent=2))
    return 0


def _plan(args: argparse.Namespace, profile: Profile, topology: Topology) -> int:
    min_tps = args.min_tps or 30.0
    conc = max(args.concurrency)
    rows = plan_table(decode_choices(profile), topology, conc, args.plan_input_lens, args.output_len, min_tps)
    print(format_plan(rows, topology, conc, min_tps))
    print("\nAssumptions:")
    for line in assumptions(profile.with_decode("ep"), Workload(conc, args.plan_input_lens[0], args.output_len, 2),
                            topology):
        print(f"  - {line}")
    if args.json:
        args.json.write_text(json.dumps({"topology": topology.label, "profile": profile.name, "concurrency": conc,
                                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0


def _sweep(args: argparse.Namespace, profile: Profile, slo_tpot: float | None) -> int:
    choices = [profile.with_decode(par, None) for par in DECODE_PARALLEL]
    if profile.speculative:
        choices += [profile.with_decode(par) for par in DECODE_PARALLEL]
    out = {}
    for conc in args.concurrency:
        workload = Workload(conc, args.input_len, args.output_len, args.requests_per_client, args.stagger_s)
        rows = sweep_splits(choices, args.sweep_splits, workload, args.slo_ttft, slo_tpot)
        slo = ", ".join(([f"TTFT <= {args.slo_ttft:g} s"] if args.slo_ttft else [])
                        + ([f"TPOT <= {slo_tpot:.1f} ms"] if slo_tpot else [])) or "no SLO"
        print(format_table([s for _, _, s in rows], labels=[f"{t.label} {p.decode_label}" for t, p, _ in rows],
                           label_header="Split, decode",
                           title=f"{args.sweep_splits} nodes, concurrency {conc}, ranked by goodput ({slo})"))
        print()
        out[conc] = [{"topology": t.label, "decode": p.decode_label, **s.to_dict()} for t, p, s in rows]
    print("Assumptions:")
    for line in assumptions(choices[-1], workload):
        print(f"  - {line}")
    if args.json:
        args.json.write_text(json.dumps({"profile": profile.name, "sweep": out}, indent=2))
    return 0


def _validate(args: argparse.Namespace, profile: Profile) -> int:
    errors = []
    for path in args.validate:
        rows = read_measurements(path)
        for r in rows:
            errors += predict_rows(profile, [r], int(r.get("input_len", args.input_len)), args.output_len)
    errors += long_context_rows(profile)
    print(format_errors(errors))
    checks = ", ".join(f"{sglang_910c_check(profile, a):.1f} ms at acceptance {a:g}" for a in (0.6, 0.75, 0.9))
    print(f"\nEP+MTP check, SGLang's DeepSeek-R1 W8A8 on 2 x 16 910C dies (DP16 attention, EP32, MTP 3, 32 "
          f"concurrent, 6K in): published TPOT ~{SGLANG_910C_TPOT_MS:g} ms; predicted {checks} (910C dies taken "
          "as 910B1s, this profile's fitted constants)")
    return 0


def _fit(args: argparse.Namespace) -> int:
    if args.write_profile is None:
        print("simulate --fit needs --write-profile PATH", file=sys.stderr)
        return 2
    rows = read_measurements(args.fit)
    if args.fit_concurrency:
        rows = [r for r in rows if int(r["concurrency"]) in args.fit_concurrency]
    hw, model = ASCEND_910B1, DEEPSEEK_R1
    profile = fit_profile(
        rows, args.input_len, args.output_len, hardware=hw, model=model,
        handoff=HandoffModel(model.kv_bytes_per_token, hw.inter_node_gb_s, args.handoff_latency_ms),
        name=args.name or args.write_profile.stem, description=args.description, source=args.fit.name,
        mfu=args.mfu, kv_efficiency=args.kv_efficiency)
    save_profile(profile, args.write_profile)
    print(f"wrote {args.write_profile}\n")
    print(format_errors(predict_rows(profile, rows, args.input_len, args.output_len) + long_context_rows(profile)))
    return 0
