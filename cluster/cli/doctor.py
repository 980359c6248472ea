"""`pdcluster doctor [--json] [--spec FILE]`: preflight checks for this node against a cluster spec.

Exit code 1 when a check the spec depends on fails (e.g. no NPU for device npu), else 0.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..tools.doctor import Check, exit_code, run_checks
from .main import load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check this node can run the cluster spec")
    parser.add_argument("--spec", type=Path, help="cluster spec YAML (default: the built-in local spec)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if spec is None:
        return 2
    results = run_checks(spec)
    code = exit_code(results)
    if args.json:
        print(json.dumps({"ok": code == 0, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_table(results))
    return code


def format_table(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:<{width}}  {r.status.upper():<6}  {r.detail}" for r in results]
    failed = sum(r.status == "fail" for r in results)
    warned = sum(r.status == "warn" for r in results)
    lines.append(f"\n{failed} failed, {warned} warnings" + ("" if failed else ": ready"))
    return "\n".join(lines)
