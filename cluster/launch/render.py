"""Deployment artefacts rendered from a ClusterSpec: the Ray Serve config and the KubeRay RayService.

One Serve config feeds `serve deploy`, `serve run` and serveConfigV2: one app builder, one spec, every route.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

from ..spec import RAY_HEAD, ClusterSpec, Role
from .ray_env import ray_env

APP_NAME = "pdcluster"
APP_IMPORT_PATH = "pdcluster.cluster.serve.app:build_app"
RAY_VERSION = "2.60.0"  # pinned in pyproject.toml; KubeRay uses it to pick its behaviour
DEFAULT_IMAGE = "pdcluster:0.1.0"
# Kubernetes extended resource per device (the Ascend device plugin names 910/910B this way).
K8S_ACCELERATOR = {"npu": "huawei.com/Ascend910", "cuda": "nvidia.com/gpu"}
APP_LABEL = {"app.kubernetes.io/name": "pdcluster"}
ASCEND_DRIVER = "/usr/local/Ascend/driver"
DASHBOARD_AGENT_PORT = 52365  # Ray's default dashboard agent HTTP port: serves the raylet health check


def serve_config(spec: ClusterSpec) -> dict[str, Any]:
    """The Ray Serve multi-application config (`ServeDeploySchema`) running pdcluster for `spec`."""
    return {
        # Proxies on the head only: one HTTP entry point; worker nodes keep their CPUs for the engine.
        # No grpc_options: Serve's gRPC proxy listens on every interface whatever http_options says,
        # so the ingress serves gRPC itself, on serve.http_host:serve.grpc_port (grpc_service.py).
        "proxy_location": "HeadOnly",
        "http_options": {"host": spec.serve.http_host, "port": spec.serve.http_port},
        # The proxy's (and the controller's) logging, then the app's: access lines only when asked.
        "logging_config": serve_logging(spec),
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": {"spec": spec.to_dict()},
            "logging_config": serve_logging(spec),
        }],
    }


def serve_logging(spec: ClusterSpec) -> dict[str, Any]:
    """Serve's `LoggingConfig` for the proxies and the app."""
    return {"enable_access_log": spec.serve.access_log}


class _Dumper(yaml.SafeDumper):
    """Readable manifests: multi-line strings (serveConfigV2) as literal blocks, no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100)


def kubernetes_spec(spec: ClusterSpec) -> ClusterSpec:
    """The spec as it runs inside KubeRay pods: Serve listens on the pod network and the Mooncake master
    is the head pod's sidecar, found through the Ray head's address (pod IPs are not known in advance);
    the cluster waits for it and never starts a second one on its ports."""
    return spec.model_copy(update={
        "serve": spec.serve.model_copy(update={"http_host": "0.0.0.0"}),
        "store": spec.store.model_copy(update={"master_host": RAY_HEAD, "bind_host": "0.0.0.0",
                                               "master": "external"}),
    })


def ray_resources_param(resources: dict[str, float]) -> str:
    """rayStartParams `resources` value: KubeRay wants the JSON wrapped in escaped double quotes,
    i.e. the YAML `'"{\\"pd_prefill\\": 1}"'` form from its docs, because it passes the string to a shell."""
    body = json.dumps({k: _num(v) for k, v in resources.items()})
    return '"' + body.replace('"', '\\"') + '"'


def rayservice(spec: ClusterSpec, image: str = DEFAULT_IMAGE, *, name: str = "pdcluster",
               namespace: str | None = None, head_cpu: str = "8", head_memory: str = "32Gi",
               api_keys_secret: str = "pdcluster-api-keys") -> dict[str, Any]:
    """KubeRay RayService (ray.io/v1): a head group (HTTP proxy, ingress, router, Mooncake master) and
    one worker group per pool; accelerators are requested when the spec's device is npu or cuda.

    Paths: weights are expected on every worker node's disk at `model.path` (mounted read-only via
    hostPath); for npu the Ascend driver is mounted from the host and the image must carry the CANN
    environment (what set_env.sh exports) in its ENV. Not exercised on a real 910B cluster here.
    """
    kspec = kubernetes_spec(spec)
    env = _env(kspec, api_keys_secret)
    metadata: dict[str, Any] = {"name": name, "labels": dict(APP_LABEL)}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": dump_yaml(serve_config(kspec)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": False,  # pools are sized by the spec, not by load
                # Ray token auth: KubeRay makes the token Secret and gives it to every Ray process
                # and its own calls; a pod that reaches the GCS or the dashboard without it gets nothing.
                "authOptions": {"mode": "token"},
                "headGroupSpec": _head_group(kspec, image, env, head_cpu, head_memory),
                "workerGroupSpecs": [_worker_group(kspec, role, image, env)
                                     for role in ("prefill", "decode")],
            },
        },
    }


def _head_group(spec: ClusterSpec, image: str, env: list[dict], cpu: str, memory: str) -> dict:
    store = spec.store
    head = {
        "name": "ray-head",
        "image": image,
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": spec.serve.http_port, "name": "serve"},
            {"containerPort": spec.serve.grpc_port, "name": "grpc"},
        ],
        "resources": _k8s_resources(cpu, memory, None, 0),
        "readinessProbe": _http_probe("/api/gcs_healthz", 8265, period=5),
        "livenessProbe": _http_probe("/api/gcs_healthz", 8265, period=10, failures=6),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if env:
        head["env"] = env
    master = {
        "name": "mooncake-master",
        "image": image,
        "command": ["mooncake_master"],
        # $(POD_IP) is expanded by the kubelet: the master listens on the pod network only.
        "args": store.master_args(bind_host="$(POD_IP)"),
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"containerPort": store.rpc_port, "name": "mc-rpc"},
            {"containerPort": store.metadata_port, "name": "mc-meta"},
            {"containerPort": store.metrics_port, "name": "mc-metrics"},
        ],
        "resources": _k8s_resources("1", "2Gi", None, 0),
        "readinessProbe": {"tcpSocket": {"port": store.rpc_port}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": store.rpc_port}, "periodSeconds": 10, "failureThreshold": 6},
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": {**APP_LABEL, "app.kubernetes.io/component": "head"}},
            "spec": {"containers": [head, master], "volumes": [_dshm()]},
        },
    }


def _worker_group(spec: ClusterSpec, role: Role, image: str, env: list[dict]) -> dict:
    pool = spec.pool(role)
    accel = K8S_ACCELERATOR.get(spec.engine.device)
    params = {"resources": ray_resources_param(spec.node_resources(role))}
    if pool.num_cpus is not None:
        params["num-cpus"] = str(pool.num_cpus)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [_dshm()]
    if spec.model.path != "embedded":
        mounts.append({"name": "model", "mountPath": spec.model.path, "readOnly": True})
        volumes.append({"name": "model", "hostPath": {"path": spec.model.path}})
    if spec.engine.device == "npu":
        mounts.append({"name": "ascend-driver", "mountPath": ASCEND_DRIVER, "readOnly": True})
        volumes.append({"name": "ascend-driver", "hostPath": {"path": ASCEND_DRIVER}})
    container = {
        "name": "ray-worker",
        "image": image,
        "resources": _k8s_resources(
            None if pool.num_cpus is None else str(pool.num_cpus),
            None if pool.memory_gib is None else f"{_num(pool.memory_gib)}Gi",
            accel, pool.accelerators_per_node),
        "readinessProbe": _http_probe("/api/local_raylet_healthz", DASHBOARD_AGENT_PORT, period=5),
        "livenessProbe": _http_probe("/api/local_raylet_healthz", DASHBOARD_AGENT_PORT, period=10,
                                     failures=6),
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    # Fixed-size pools: a prefill/decode node is a whole machine, never autoscaled.
    return {
        "groupName": role,
        "replicas": pool.replicas,
        "minReplicas": pool.replicas,
        "maxReplicas": pool.replicas,
        "rayStartParams": params,
        "template": {
            "metadata": {"labels": {**APP_LABEL, "app.kubernetes.io/component": role}},
            "spec": {"containers": [container], "volumes": volumes},
        },
    }


def _env(spec: ClusterSpec, secret: str) -> list[dict]:
    # Every Ray container starts with the spec's Serve proxy mode (ray_env.py); the API keys come
    # from a Secret into each of them too (an ingress replica may land on any node).
    env = [{"name": name, "value": value} for name, value in ray_env(spec).items()]
    if spec.serve.api_keys_env:
        env.append({"name": spec.serve.api_keys_env,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": "keys"}}})
    return env


def _k8s_resources(cpu: str | None, memory: str | None, accel: str | None, n: int) -> dict:
    res: dict[str, Any] = {}
    if cpu:
        res["cpu"] = cpu
    if memory:
        res["memory"] = memory
    if accel and n:
        res[accel] = str(n)  # extended resources: requests must equal limits
    return {"limits": dict(res), "requests": dict(res)} if res else {}


def _http_probe(path: str, port: int, *, period: int, failures: int = 3) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": failures}


def _dshm() -> dict:
    # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
    return {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v
