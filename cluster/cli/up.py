"""`pdcluster up | down | status`: run the served cluster, stop it, and show what it is doing.

`up` with no arguments serves the embedded model on this machine until Ctrl-C (or `pdcluster down`
from another shell); with --address it deploys onto an existing Ray cluster and returns.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    # One module serves three verbs, each listed in cli.VERBS: register them all once.
    if "up" in sub.choices:
        return
    up = sub.add_parser("up", help="start the served cluster (embedded model on this machine by default)")
    up.add_argument("--config", type=Path, help="cluster spec YAML (default: the built-in local spec)")
    up.add_argument("--address", help="deploy onto this existing Ray cluster (host:port) and return")
    up.add_argument("--verbose", action="store_true",
                    help="also print Ray's, Serve's and Mooncake's own lines here (else only to the "
                         "log files whose folder `up` prints)")
    up.set_defaults(func=run_up)

    down = sub.add_parser("down", help="stop the cluster started by `pdcluster up`")
    down.add_argument("--address", help="remove pdcluster from this existing Ray cluster instead")
    down.set_defaults(func=run_down)

    status = sub.add_parser("status", help="show the cluster's workers, queue and load")
    status.add_argument("--address", help="the Ray cluster to inspect (default: the local one)")
    status.set_defaults(func=run_status)


def run_up(args: argparse.Namespace) -> int:
    import logging

    from ..launch import deployment as local_cluster
    from .main import load_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        driver_log = None if args.verbose else _route_ray_logs(local_cluster.runtime_dir() / "up.log")
    except RuntimeError as exc:  # a runtime dir another user could write
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spec = load_spec(args.config)
    if spec is None:
        return 2
    if args.address:
        state = local_cluster.up_remote(spec, args.address, verbose=args.verbose)
        _print_endpoints(state)
        print("Its logs: the Ray session's logs/ folder on each node; `pdcluster down --address "
              f"{args.address}` stops it.", flush=True)
        return 0

    def started(log_dir: str) -> None:
        own = f" (this command's: {driver_log})" if driver_log else ""
        print(f"pdcluster is starting {spec.model.served_name}; logs of Ray, Serve, Mooncake and the "
              f"workers: {log_dir}{own}", flush=True)

    def ready(state: local_cluster.UpState) -> None:
        _print_endpoints(state)
        print("Ctrl-C or `pdcluster down` (from another shell) stops it.", flush=True)

    try:
        local_cluster.up_local(spec, threading.Event(), on_ready=ready, on_started=started,
                               verbose=args.verbose)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("pdcluster stopped.")
    return 0


def _route_ray_logs(path: Path) -> Path:
    """Ray's and Serve's routine lines in this process (token auth, "Started Serve", "Deploying")
    go to `path` (rewritten by each `up`); only their errors still reach the terminal."""
    import logging

    import ray  # noqa: F401  (configures the "ray" logger)
    from ray import serve  # noqa: F401  (configures "ray.serve")

    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.serve"):
        logger = logging.getLogger(name)
        for terminal in logger.handlers:
            terminal.setLevel(logging.ERROR)
        logger.addHandler(handler)
    return path


def _print_endpoints(state) -> None:
    print(f"pdcluster is serving {state.model}\n"
          f"  OpenAI API: {state.http_url}/v1   (metrics: {state.http_url}/metrics)\n"
          f"  gRPC:       {state.grpc_address}   (pdcluster.inference.v1.Inference/Generate)\n"
          f"  health:     {state.http_url}/health   (`pdcluster status` shows the workers and load)",
          flush=True)


def run_down(args: argparse.Namespace) -> int:
    from ..launch import deployment as local_cluster

    try:
        print(local_cluster.down(args.address))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def speculation_summary(w) -> str:
    """`pdcluster status`'s speculative decoding column: the mean accepted length (tokens per
    verification) and the share of draft tokens accepted; "-" for a worker that has not speculated."""
    length = w.mean_accepted_length
    if length is None:
        return "-"
    return f"len {length:.2f} ({w.spec_accepted_tokens / w.spec_draft_tokens:.0%})"


def threads_summary(w) -> str:
    """`pdcluster status`'s threads column: the engine's threads, or its share and the most its
    steps take while the host's other engines idle ("1-2")."""
    return f"{w.threads}-{w.most_threads}" if w.most_threads > w.threads else str(w.threads)


def run_status(args: argparse.Namespace) -> int:
    from ..launch import deployment as local_cluster

    try:
        st = local_cluster.status(args.address)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(st.rejected_total.items())) or "none"
    print(f"ray: {st.ray_address}   serve app: {st.serve_status}\n"
          f"in flight: {st.in_flight}   queued: {st.queued}   admitted: {st.admitted_total}   "
          f"rejected: {rejected}")
    if st.master:
        m = st.master
        print(f"mooncake master: {m['rpc_address']} {'healthy' if m['healthy'] else 'UNHEALTHY'}"
              f" ({'managed, pid ' + str(m['pid']) if m['managed'] else 'external'}, "
              f"restarts {m['restarts']})")
    print(f"{'worker':<12}{'role':<9}{'node':<16}{'health':<9}{'threads':>8}{'running':>8}"
          f"{'free blocks':>14}{'placed':>8}{'spec accepted':>22}")
    for w in st.workers:
        print(f"{w.worker_id:<12}{w.role:<9}{w.node_ip:<16}{'ok' if w.healthy else 'DOWN':<9}"
              f"{threads_summary(w):>8}{w.running_seqs:>8}"
              f"{f'{w.free_blocks}/{w.total_blocks}':>14}{w.placed_total:>8}"
              f"{speculation_summary(w):>22}")
    return 0
