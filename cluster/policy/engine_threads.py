"""How many torch threads a worker's engine runs with when the spec leaves `engine.threads` unset:
the cores of its host, shared among the pdcluster workers placed on that host and their TP ranks,
as a share each always has, and for decode engines, step by step, the cores the host's other
engines leave idle.

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


def usable_cores(cores: int, node_cpus: float) -> int:
    """The cores this process may run on, capped by the node's Ray CPU count when it advertises
    fewer (as a pod's limit does)."""
    return max(1, min(cores, int(node_cpus)) if node_cpus >= 1 else cores)


def engine_threads(cores: int, node_cpus: float, workers: int, tp_size: int) -> int:
    """Threads for one TP rank of one of `workers` workers sharing a host: its share, the usable
    cores split evenly among every rank of every worker on the host."""
    return max(1, usable_cores(cores, node_cpus) // (max(1, workers) * max(1, tp_size)))


# Fewest sequences a decode step needs before it takes more than its share. A batch-1 step is a few
# hundred parallel regions of tens of microseconds each; where the serving processes share the cores
# (the worker actor's streams, the ingress, HTTP), their work preempts the step's threads at its
# barriers, and a second thread costs more than it gains (README, "Decode steps on the cores an idle
# prefill engine leaves").
EXPAND_FROM_SEQS = 4

# Streams that leave the engine at least this many tokens at a time (`engine.stream_interval`) send
# the serving processes that much fewer messages, and then a step of any size gains from the idle
# cores (README, "Tokens N at a time": 1.10-1.26x TPOT at 1 and 2 streams with 8).
LIGHT_STREAM_INTERVAL = 8


def expand_from_seqs(stream_interval: int) -> int:
    """Fewest sequences a decode step needs before it takes more than its share, for streams that
    leave the engine `stream_interval` tokens at a time."""
    return 1 if stream_interval >= LIGHT_STREAM_INTERVAL else EXPAND_FROM_SEQS


def step_threads(share: int, most: int, others_busy: int, decode_seqs: int,
                 expand_from: int = EXPAND_FROM_SEQS) -> int:
    """Threads for an engine's next step, which decodes `decode_seqs` sequences (0: it computes
    prompt tokens): of the `most` cores it may step on (its host's usable cores, or just its
    share), those its host's other engines are not stepping on (`others_busy`: the threads they
    step with), never fewer than its `share`. Steps with prompt work, and decode steps of fewer than
    `expand_from` sequences, keep the share: a prompt step lasts up to seconds and would hold
    the cores that long."""
    if decode_seqs < max(1, expand_from):
        return share
    return max(share, most - others_busy)


def most_threads(role: str, share: int, usable: int, tp_size: int) -> int:
    """The most threads an engine steps with when the host's other engines idle; 0 where it stays
    off the host's board on a fixed share (it has the host's cores to itself, or is a tensor-parallel
    rank, whose ranks step in lockstep on equal shares). Decode engines take the
    idle cores: a decode step is short (tens of ms), so one that took them gives them back within a
    step once a prefill starts. A prefill engine keeps its share: its steps (whole prompt chunks,
    up to seconds) would hold cores a decode engine needs for their whole length."""
    if usable <= share or tp_size > 1:
        return 0
    return usable if role == "decode" else share
