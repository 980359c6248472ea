"""A worker whose spec leaves engine.threads unset takes its host's cores, shared with the other
workers placed on that host and with its TP ranks."""
from __future__ import annotations

from pdcluster.cluster.policy.engine_threads import NodeView, engine_threads, workers_on_host

PD = {"pd_prefill": 1, "pd_decode": 1}
COLOCATED = {"pd_prefill": 0, "pd_decode": 1}


def node(host: str, *resources: str, cpus: float = 16) -> NodeView:
    return NodeView(hostname=host, cpus=cpus, resources=frozenset({"CPU", *resources}))


def test_local_up_one_node_with_both_roles():
    nodes = [node("box", "pd_prefill", "pd_decode")]
    # PD: prefill and decode share the machine's cores; colocated: its one worker has them all
    assert workers_on_host(nodes, "box", PD) == 2
    assert engine_threads(16, 16, workers_on_host(nodes, "box", PD), 1) == 8
    assert workers_on_host(nodes, "box", COLOCATED) == 1
    assert engine_threads(16, 16, workers_on_host(nodes, "box", COLOCATED), 1) == 16


def test_two_ray_nodes_on_one_machine_split_it_and_separate_machines_do_not():
    same_host = [node("box", "pd_prefill"), node("box", "pd_decode")]
    assert workers_on_host(same_host, "box", PD) == 2
    two_hosts = [node("a", "pd_prefill"), node("b", "pd_decode")]
    assert workers_on_host(two_hosts, "a", PD) == workers_on_host(two_hosts, "b", PD) == 1


def test_a_pool_counts_no_more_workers_than_its_replicas():
    nodes = [node("box", "pd_decode"), node("box", "pd_decode"), node("box", "pd_decode")]
    assert workers_on_host(nodes, "box", {"pd_prefill": 0, "pd_decode": 2}) == 2
    assert workers_on_host([], "unknown", PD) == 1  # never fewer than the caller itself


def test_tp_ranks_and_a_pods_cpu_limit_share_the_cores():
    assert engine_threads(16, 16, 1, 4) == 4
    assert engine_threads(64, 8, 1, 1) == 8  # a pod limited to 8 CPUs on a 64-core host
    assert engine_threads(2, 4, 2, 1) == 1  # local up advertises more CPUs than the machine has
    assert engine_threads(2, 0, 4, 2) == 1  # never zero
