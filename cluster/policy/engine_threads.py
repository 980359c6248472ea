"""How many torch threads a worker's engine runs with when the spec leaves `engine.threads` unset:
the cores of its host, shared among the pdcluster workers placed on that host and their TP ranks.

Pure (stdlib only): the worker actor passes in what Ray says about the nodes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeView:
    """One Ray node as the thread decision sees it."""
    hostname: str  # several Ray nodes may run on one machine (deploy/cluster-local.yaml)
    cpus: float  # the node's Ray CPU resource (the pod's CPU limit on Kubernetes)
    resources: frozenset[str]  # the custom resources it advertises (the pools' role resources)


def workers_on_host(nodes: Iterable[NodeView], hostname: str, pools: Mapping[str, int]) -> int:
    """How many workers run on `hostname`: per pool (role resource -> replicas), one on each of the
    host's nodes that carries its role resource, at most the pool's replicas; at least 1 (the
    caller's own)."""
    here = [n for n in nodes if n.hostname == hostname]
    count = sum(min(replicas, sum(resource in n.resources for n in here))
                for resource, replicas in pools.items() if replicas > 0)
    return max(1, count)


def engine_threads(cores: int, node_cpus: float, workers: int, tp_size: int) -> int:
    """Threads for one TP rank of one of `workers` workers sharing a host: the cores this process may
    run on (capped by the node's Ray CPU count when it advertises fewer, as a pod's limit does),
    split evenly among every rank of every worker on the host."""
    usable = min(cores, int(node_cpus)) if node_cpus >= 1 else cores
    return max(1, usable // (max(1, workers) * max(1, tp_size)))
