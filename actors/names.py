"""Where pdcluster's actors are found: the Ray namespace, the named actors, the head-node resource.

Every module that looks an actor up by name imports it from here, so no import runs back up.
"""
from __future__ import annotations

NAMESPACE = "pdcluster"
CONTROLLER_NAME = "pdcluster-controller"
ROUTER_NAME = "pdcluster-router"
MASTER_NAME = "pdcluster-mooncake-master"
NODE_CLIENT_PREFIX = "mooncake-client-"
# A sliver of the head node's own resource: pins an actor (router, controller, ingress) to the head.
HEAD_NODE = {"node:__internal_head__": 0.001}


def node_client_name(host: str, port: int) -> str:
    """The node store client supervisor serving `host:port` (one per node and port)."""
    return f"{NODE_CLIENT_PREFIX}{host}-{port}"
