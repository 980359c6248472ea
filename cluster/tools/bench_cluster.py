"""PD versus colocated on this machine: the same `pdcluster bench` sweep against the disaggregated
cluster and against a colocated deployment of the same model, in one run, side by side.

    python -m pdcluster.cluster.tools.bench_cluster [--concurrency 1 2 4 8] [--input-len 128] [--output-len 64]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..spec import ClusterSpec
from ..supervised_process import free_port
from .bench_client import (
    BenchConfig,
    Endpoint,
    TokenCounter,
    render_markdown,
    run_sweep,
    token_counter,
    write_report,
)
from .perf_metrics import LevelStats

# Both deployments get the same CPUs: PD runs a prefill and a decode engine with one thread each;
# colocated runs one engine (decode workers compute prompts too: `prefill.replicas: 0`) with two.
# They run one after the other on a local Ray (one pdcluster per Ray namespace), then the tables,
# the comparison and a JSON/Markdown/PNG report (`--out`) are written.


def local_spec(colocated: bool, kv_blocks: int, ports: dict[str, dict[str, int]],
               core: str | None = None, threads: str = "split",
               matmul_activations: str = "auto", stream_interval: int = 1,
               http_proxy: str = "serve") -> ClusterSpec:
    """A deployment on this machine; `core` is engine.core (None: the default). `threads` "split":
    engine.threads set to the machine's cores split among the workers; "shared": left unset, as a
    user's spec leaves it (decode steps also take the cores an idle prefill engine leaves)."""
    cores = os.cpu_count() or 2
    return ClusterSpec.from_dict({
        "engine": {"device": "cpu", "num_kv_blocks": kv_blocks, "core": core,
                   "threads": None if threads == "shared" else cores if colocated else max(1, cores // 2),
                   "matmul_activations": matmul_activations, "stream_interval": stream_interval},
        "prefill": {"replicas": 0 if colocated else 1},
        **ports,
        "serve": {**ports["serve"], "http_proxy": http_proxy},
    })


def local_ports() -> dict[str, dict[str, int]]:
    """Free ports for one local deployment's store and Serve (shared by the deployments of a run)."""
    return {"store": {"rpc_port": free_port(), "metadata_port": free_port(), "metrics_port": free_port()},
            "serve": {"http_port": free_port(), "grpc_port": free_port(), "haproxy_stats_port": free_port(),
                      "haproxy_metrics_port": free_port(), "fallback_proxy_port": free_port()}}


def prompt_counter(spec: ClusterSpec) -> TokenCounter:
    """Counts tokens with the served model's own tokenizer (for prompts of an exact length)."""
    from ...engine.tokenizer import Tokenizer
    from ...engine.weights import resolve_model_path
    return token_counter(Tokenizer(resolve_model_path(spec.model.path)).hf)


def sweep_deployments(cfg: BenchConfig, specs: dict[str, ClusterSpec], count: TokenCounter,
                      peers: Sequence[Endpoint] = (), progress: bool = True,
                      ) -> tuple[dict[str, list[LevelStats]], list[Endpoint]]:
    """Deploys each spec in turn on a local Ray (one pdcluster per Ray namespace) and runs the sweep
    against it; `peers` (other servers) are swept level by level beside the first deployment, each
    on prompts of its own, of the same lengths. Ray restarts where a spec needs another environment
    (Serve's proxy mode). Returns the results by name (deployments, then peers) and the endpoints."""
    import ray
    from ray import serve

    from ...actors.names import NAMESPACE
    from ..launch.deployment import deploy, http_url, teardown
    from ..launch.ray_env import this_machines_ray_env

    results: dict[str, list[LevelStats]] = {}
    endpoints: list[Endpoint] = []
    running: dict[str, str] | None = None   # the environment the running Ray started with
    try:
        for i, (name, spec) in enumerate(specs.items()):
            if (needed := this_machines_ray_env(spec)) != running:
                ray.shutdown()
                running = needed
                os.environ.update(running)
                ray.init(namespace=NAMESPACE, num_cpus=max(4, os.cpu_count() or 1),
                         include_dashboard=False, resources={"pd_prefill": 1, "pd_decode": 1},
                         logging_level=logging.WARNING,
                         log_to_driver=False)   # the workers' routine lines stay in Ray's session logs
            deploy(spec)
            try:
                endpoint = Endpoint(name, http_url(spec) + "/v1")
                swept = [endpoint, *(peers if i == 0 else ())]
                endpoints += swept
                results.update(asyncio.run(run_sweep(cfg, swept, count, progress=progress)))
            finally:
                teardown()
                serve.shutdown()     # the next deployment starts Serve afresh
    finally:
        ray.shutdown()
    order = [e.name for e in endpoints if e.name in specs] + [p.name for p in peers]
    return {name: results[name] for name in order}, endpoints


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--requests-per-level", type=int, default=None)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("bench_out/pd_vs_colocated"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    ports = local_ports()
    specs = {"pd": local_spec(False, args.kv_blocks, ports),
             "colocated": local_spec(True, args.kv_blocks, ports)}
    cfg = BenchConfig(model=specs["pd"].model.served_name, input_len=args.input_len,
                      output_len=args.output_len, concurrency=tuple(args.concurrency),
                      requests_per_level=args.requests_per_level)
    results, endpoints = sweep_deployments(cfg, specs, prompt_counter(specs["pd"]))
    print(render_markdown(cfg, results))
    for path in write_report(args.out, cfg, endpoints, results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
