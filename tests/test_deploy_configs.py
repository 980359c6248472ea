"""Deployment artefacts: the Serve config, `ray up` cluster configs, KubeRay manifests, Grafana dashboard.

Each is validated against the schema of the tool that consumes it (Ray Serve's pydantic models, Ray's
cluster-config JSON schema, the KubeRay CRDs) and checked against the spec it must agree with.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from pdcluster.cluster.launch import render
from pdcluster.cluster.serve.metric_names import METRIC_NAMES, METRICS_BY_NAME
from pdcluster.cluster.spec import ClusterSpec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KUBERAY = SHARED / "schemas" / "kuberay"
PROD = ClusterSpec.from_yaml(REPO / "deploy/spec.yaml")
LOCAL = ClusterSpec.from_yaml(REPO / "deploy/spec-local.yaml")


def _load(rel: str) -> Any:
    return yaml.safe_load((REPO / rel).read_text())


# ------------------------------------------------------------------------------------ Serve config

def _assert_known_keys(model: type[BaseModel], data: dict, where: str = "") -> None:
    """Serve's schema models ignore unknown keys; a misspelt option would silently fall back to its
    default, so check every key against the model's fields ourselves."""
    for key, value in data.items():
        assert key in model.model_fields, f"unknown Serve config key {where}{key}"
        ann = model.model_fields[key].annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is not None and isinstance(value, dict):
            _assert_known_keys(sub, value, f"{where}{key}.")
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                _assert_known_keys(sub, item, f"{where}{key}[{i}].")


def _validate_serve(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    _assert_known_keys(ServeDeploySchema, config)


@pytest.mark.parametrize("spec", [LOCAL, PROD], ids=["local", "production"])
def test_serve_config_is_valid_for_ray_serve_and_carries_the_spec(spec: ClusterSpec) -> None:
    config = render.serve_config(spec)
    _validate_serve(config)
    assert config["http_options"] == {"host": spec.serve.http_host, "port": spec.serve.http_port}
    # Serve's gRPC proxy would listen on every interface: the ingress serves gRPC itself instead.
    assert "grpc_options" not in config
    (app,) = config["applications"]
    assert app["import_path"] == "pdcluster.cluster.serve.app:build_app"
    assert ClusterSpec.from_dict(app["args"]["spec"]) == spec


def test_known_keys_check_catches_a_misspelt_serve_option() -> None:
    config = render.serve_config(LOCAL)
    config["http_options"]["prot"] = 8001
    with pytest.raises(AssertionError, match="http_options.prot"):
        _validate_serve(config)


def test_committed_serve_config_is_current() -> None:
    # Regenerate: pdcluster render serve-config --spec deploy/spec.yaml -o deploy/serve_config.yaml
    assert _load("deploy/serve_config.yaml") == render.serve_config(PROD)


def test_render_cli_writes_what_the_function_renders(tmp_path: Path) -> None:
    from pdcluster.cluster.cli.main import main

    out = tmp_path / "serve.yaml"
    assert main(["render", "serve-config", "--spec", str(REPO / "deploy/spec-local.yaml"), "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == render.serve_config(LOCAL)
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  devcie: cpu\n")
    assert main(["render", "serve-config", "--spec", str(bad)]) == 2


# ------------------------------------------------------------------------------- ray up configs

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("rel", ["deploy/cluster.yaml", "deploy/cluster-local.yaml"])
def test_cluster_config_validates_against_rays_schema(rel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _load(rel)
    jsonschema.validate(config, _ray_schema())
    assert config["provider"]["type"] == "local"
    # What `ray up` does with it (Ray is pinned, so its private helpers are a stable target): fill in
    # defaults, turn the local provider's IP lists into its single node type, validate again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.chdir(REPO)  # file_mounts name local paths relative to where `ray up` runs
    prepared = prepare_config(config)
    validate_config(prepared)
    workers = prepared["available_node_types"]["local.cluster.node"]
    assert workers["min_workers"] == workers["max_workers"] == len(config["provider"]["worker_ips"])


@pytest.mark.parametrize("mutate", [
    lambda c: c.__setitem__("head_start_ray_command", c.pop("head_start_ray_commands")),
    lambda c: c["auth"].__setitem__("ssh_usr", c["auth"].pop("ssh_user")),
    lambda c: c.__setitem__("max_workers", "six"),
], ids=["top-level", "auth", "type"])
def test_ray_schema_rejects_a_misspelt_cluster_config(mutate: Any) -> None:
    config = _load("deploy/cluster.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


# Stand-ins for the commands the start scripts call, so the real role lookup runs here; the real
# `pdcluster` CLI runs on the repository's deploy/ (which file_mounts puts at ~/pdcluster/deploy).
_STUBS = """
hostname() { if [ "$1" = "-I" ]; then echo "$FAKE_IPS"; else echo node; fi; }
source() { :; }
ray() { echo "HCCL_IF_IP=$HCCL_IF_IP"; env | grep '^RAY_SERVE_' | sed 's/^/ENV /'; for a in "$@"; do echo "ARG $a"; done; }
pdcluster() { "$PYTHON" -m pdcluster.cluster.cli.main "${@/#$HOME\/pdcluster\//$REPO/}"; }
export RAY_HEAD_IP=10.0.0.10
"""


def _run_worker_start(command: str, ips: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    return subprocess.run(["bash", "-c", _STUBS + command], capture_output=True, text=True, timeout=60,
                          env={**env, "FAKE_IPS": ips, "PYTHON": sys.executable, "REPO": str(REPO)})


@pytest.mark.parametrize("rel, spec", [("deploy/cluster.yaml", PROD), ("deploy/cluster-local.yaml", LOCAL)])
def test_every_ray_start_carries_the_specs_serve_proxy_environment(rel: str, spec: ClusterSpec) -> None:
    """Serve reads its proxy mode only when Ray's processes start: each node's `ray start` gets the
    variables `pdcluster render ray-env` gives for the spec the cluster runs."""
    from pdcluster.cluster.launch.ray_env import this_machines_ray_env

    config = _load(rel)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for start in starts:
        done = _run_worker_start(start, " ".join(config["provider"]["worker_ips"][:1]))
        assert done.returncode == 0, done.stderr
        env = dict(line[4:].split("=", 1) for line in done.stdout.splitlines() if line.startswith("ENV "))
        assert env == this_machines_ray_env(spec) and "RAY_SERVE_ENABLE_HA_PROXY" in env


def _args(out: str) -> dict[str, str]:
    args = [line[4:] for line in out.splitlines() if line.startswith("ARG ")]
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in args)


def test_cluster_yaml_worker_roles_match_the_production_spec() -> None:
    config = _load("deploy/cluster.yaml")
    start = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(start) == 1
    roles: dict[str, list[str]] = {"prefill": [], "decode": []}
    for ip in config["provider"]["worker_ips"]:
        # A second interface (e.g. docker0) must not confuse the lookup.
        done = _run_worker_start(start[0], f"172.17.0.1 {ip}")
        assert done.returncode == 0, done.stderr
        args = _args(done.stdout)
        role = "prefill" if '"pd_prefill"' in args["--resources"] else "decode"
        roles[role].append(ip)
        assert json.loads(args["--resources"]) == PROD.node_resources(role)
        assert args["--num-cpus"] == str(PROD.pool(role).num_cpus)
        assert args["--node-ip-address"] == ip and f"HCCL_IF_IP={ip}" in done.stdout
        assert args["--address"] == "10.0.0.10:6379"
    assert len(roles["prefill"]) == PROD.prefill.replicas
    assert len(roles["decode"]) == PROD.decode.replicas


def test_cluster_yaml_worker_outside_the_role_map_refuses_to_start() -> None:
    start = next(c for c in _load("deploy/cluster.yaml")["worker_start_ray_commands"] if "ray start" in c)
    done = _run_worker_start(start, "10.9.9.9")
    assert done.returncode != 0 and "ARG" not in done.stdout
    assert "neither PREFILL_IPS nor DECODE_IPS" in done.stderr


@pytest.mark.parametrize("rel, spec", [("deploy/cluster.yaml", PROD), ("deploy/cluster-local.yaml", LOCAL)])
def test_head_runs_mooncake_master_as_the_spec_configures_it(rel: str, spec: ClusterSpec) -> None:
    config = _load(rel)
    assert config["provider"]["head_ip"] == spec.store.master_host == spec.store.bind_host
    master = next(c for c in config["head_start_ray_commands"] if "mooncake_master " in c)
    tokens = shlex.split(master)
    assert set(spec.store.master_args()) <= set(tokens)
    head = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert f"--node-ip-address={config['provider']['head_ip']}" in head


def test_cluster_local_runs_one_prefill_and_one_decode_node_on_one_host() -> None:
    config = _load("deploy/cluster-local.yaml")
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    (worker,) = config["worker_start_ray_commands"]
    res = {name: json.loads(dict(a.split("=", 1) for a in shlex.split(cmd) if "=" in a)["--resources"])
           for name, cmd in (("head", head), ("worker", worker))}
    assert res == {"head": LOCAL.node_resources("prefill"), "worker": LOCAL.node_resources("decode")}
    # `ray stop` on the worker would kill the head: both live on the same machine.
    assert not any("ray stop" in c for c in config["worker_start_ray_commands"])
    assert "--dashboard-agent-listen-port=" in worker
    assert {config["provider"]["head_ip"], *config["provider"]["worker_ips"]} <= {"127.0.0.1", "127.0.0.2"}


# ------------------------------------------------------------------------------------- KubeRay

def _structural_to_jsonschema(node: Any) -> Any:
    """Kubernetes structural schema -> JSON Schema, strict: an object with `properties` and no
    x-kubernetes-preserve-unknown-fields is closed, so a misspelt field fails (Kubernetes would prune it
    silently)."""
    if isinstance(node, list):
        return [_structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "description")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and not preserve and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


_META = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    # The CRDs are large: parse once per session, with libyaml when present.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((KUBERAY / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace/remove: what kustomize does with the overlay's patch."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        elif op["op"] in ("add", "replace"):
            if isinstance(target, list):
                idx = len(target) if last == "-" else int(last)
                target[idx:idx + (op["op"] == "replace")] = [op["value"]]
            else:
                assert op["op"] == "add" or last in target, f"replace of missing {op['path']}"
                target[last] = op["value"]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")
    return doc


def _kustomize_docs(directory: Path) -> list[dict]:
    """Resources of a kustomization, with JSON6902 patches applied (the only kind our overlays use)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        docs += _kustomize_docs(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), "overlays use JSON6902 patches only"
        target = patch["target"]
        for i, d in enumerate(docs):
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]:
                docs[i] = _json_patch(d, ops)
    return docs


def _ray_docs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") in ("RayService", "RayCluster")]


K8S_BUILDS = {"base": REPO / "k8s/base", "cpu-smoke": REPO / "k8s/overlays/cpu-smoke"}


@pytest.mark.parametrize("build", list(K8S_BUILDS))
def test_every_ray_document_validates_against_the_kuberay_crd(build: str) -> None:
    docs = _ray_docs(_kustomize_docs(K8S_BUILDS[build]))
    assert docs
    for doc in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(doc["kind"]).iter_errors(doc)]
        assert not errors, errors


def test_all_ray_documents_under_k8s_are_covered_by_a_build() -> None:
    built = {json.dumps(d, sort_keys=True) for b in K8S_BUILDS.values() for d in _ray_docs(_kustomize_docs(b))}
    for path in (REPO / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in ("RayService", "RayCluster"):
                assert json.dumps(doc, sort_keys=True) in built, f"{path} is in no kustomize build"


@pytest.mark.parametrize("mutate, where", [
    (lambda s: s["rayClusterConfig"].__setitem__("workerGroupSpec", s["rayClusterConfig"].pop("workerGroupSpecs")),
     "workerGroupSpec"),
    (lambda s: s["rayClusterConfig"]["headGroupSpec"].__setitem__("rayStartParam", {}), "rayStartParam"),
    (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolicyy", "Always"), "imagePullPolicyy"),
    (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][1].__setitem__("replicas", "four"), "replicas"),
    (lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"].__setitem__("num-gpus", 1),
     "rayStartParams"),
])
def test_crd_validation_rejects_misspelt_or_mistyped_fields(mutate: Any, where: str) -> None:
    doc = render.rayservice(PROD)
    mutate(doc["spec"])
    errors = list(_crd_validator("RayService").iter_errors(doc))
    assert errors and any(where in (e.message + "/".join(map(str, e.absolute_path))) for e in errors), errors


def test_int_or_string_ports_accept_both_forms() -> None:
    doc = render.rayservice(PROD)
    probe = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    v = _crd_validator("RayService")
    for port in (8265, "dashboard"):
        probe["httpGet"]["port"] = port
        assert not list(v.iter_errors(doc))
    probe["httpGet"]["port"] = 1.5
    assert list(v.iter_errors(doc))


def test_committed_manifests_are_current() -> None:
    # Regenerate with the commands in k8s/base/kustomization.yaml and k8s/overlays/cpu-smoke/.
    assert _load("k8s/base/rayservice.yaml") == render.rayservice(PROD)
    smoke = render.rayservice(LOCAL, head_cpu="2", head_memory="4Gi")
    assert _load("k8s/overlays/cpu-smoke/rayservice-patch.yaml") == [
        {"op": "replace", "path": "/spec", "value": smoke["spec"]}]


def _groups(doc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _unquote_resources(param: str) -> dict:
    # KubeRay's documented form: the JSON wrapped in double quotes with its own quotes escaped.
    assert param.startswith('"{') and param.endswith('}"')
    return json.loads(param[1:-1].replace('\\"', '"'))


def test_production_rayservice_requests_npus_and_advertises_roles() -> None:
    doc = render.rayservice(PROD)
    groups = _groups(doc)
    assert set(groups) == {"prefill", "decode"}
    for role, g in groups.items():
        pool = PROD.pool(role)
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == pool.replicas
        assert _unquote_resources(g["rayStartParams"]["resources"]) == PROD.node_resources(role)
        (c,) = g["template"]["spec"]["containers"]
        for kind in ("limits", "requests"):
            assert c["resources"][kind]["huawei.com/Ascend910"] == "8"
        assert c["readinessProbe"] and c["livenessProbe"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert PROD.model.path in mounts
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["containerPort"] for p in head[0]["ports"]}
    assert {8000, 9000, 8265, 6379} <= ports
    master = next(c for c in head if c["name"] == "mooncake-master")
    assert f"--rpc_port={PROD.store.rpc_port}" in master["args"]


def test_rayservice_serve_config_runs_in_kubernetes_mode() -> None:
    doc = render.rayservice(PROD)
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _validate_serve(config)
    assert config == render.serve_config(render.kubernetes_spec(PROD))
    inner = ClusterSpec.from_dict(config["applications"][0]["args"]["spec"])
    assert inner.serve.http_host == "0.0.0.0" and inner.store.master_host == "ray-head"
    assert inner.model == PROD.model and inner.engine == PROD.engine


def test_cpu_smoke_overlay_has_no_npus_and_runs_the_embedded_model() -> None:
    (doc,) = _ray_docs(_kustomize_docs(K8S_BUILDS["cpu-smoke"]))
    text = json.dumps(doc)
    assert "Ascend" not in text and "NPU" not in text
    for role, g in _groups(doc).items():
        assert g["replicas"] == 1
        assert _unquote_resources(g["rayStartParams"]["resources"]) == {f"pd_{role}": 1}
    spec = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["spec"]
    assert spec["model"]["path"] == "embedded" and spec["engine"]["device"] == "cpu"


def test_service_and_servicemonitor_expose_the_serve_ports() -> None:
    base = _kustomize_docs(K8S_BUILDS["base"])
    (svc,) = [d for d in base if d["kind"] == "Service"]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["http"]["port"] == PROD.serve.http_port and ports["grpc"]["port"] == PROD.serve.grpc_port
    (rs,) = _ray_docs(base)
    head_labels = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    # ray.io/serve is set by KubeRay on pods whose Serve proxy is healthy.
    assert set(svc["spec"]["selector"].items()) <= set(head_labels.items()) | {("ray.io/serve", "true")}
    mon = yaml.safe_load((REPO / "k8s/base/servicemonitor.yaml").read_text())
    assert mon["kind"] == "ServiceMonitor"
    assert set(mon["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= set(ports)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("build", list(K8S_BUILDS))
def test_our_patch_application_matches_kustomize(build: str) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S_BUILDS[build])], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    by_kind = lambda docs: {(d["kind"], d["metadata"]["name"]): d for d in docs}  # noqa: E731
    assert by_kind(d for d in yaml.safe_load_all(done.stdout) if d) == by_kind(_kustomize_docs(K8S_BUILDS[build]))


# ------------------------------------------------------------------------------------- Grafana

_METRIC = re.compile(r"\bpdcluster_[a-z0-9_]+")


def _exprs() -> list[str]:
    dash = json.loads((REPO / "deploy/grafana/pdcluster.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _base_name(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and METRICS_BY_NAME.get(base) and METRICS_BY_NAME[base].kind == "histogram":
            return base
    return series


def test_dashboard_uses_only_exported_metrics_and_covers_them_all() -> None:
    used = {_base_name(m) for e in _exprs() for m in _METRIC.findall(e)}
    assert used - METRIC_NAMES == set()
    assert METRIC_NAMES - used == set()


def test_dashboard_queries_respect_metric_kinds_and_labels() -> None:
    for expr in _exprs():
        names = {_base_name(m) for m in _METRIC.findall(expr)}
        labels = set().union(*(METRICS_BY_NAME[n].labels for n in names))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= labels | {"le"}, expr
        for series in _METRIC.findall(expr):
            kind = METRICS_BY_NAME[_base_name(series)].kind
            if series.endswith("_bucket"):
                assert "histogram_quantile" in expr
            elif kind == "histogram" and series == _base_name(series):
                raise AssertionError(f"histogram {series} used without _bucket/_sum/_count: {expr}")
            elif kind == "counter" or series != _base_name(series):   # a counter, or a _sum/_count
                assert f"rate({series}" in expr, f"counter {series} must be rated: {expr}"


def test_kubernetes_ray_uses_token_auth_and_only_pdcluster_pods_reach_ray_and_the_store() -> None:
    for build in K8S_BUILDS.values():
        (service,) = [d for d in _kustomize_docs(build) if d["kind"] == "RayService"]
        assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    policies = {d["metadata"]["name"]: d["spec"] for d in _kustomize_docs(K8S_BUILDS["base"])
                if d["kind"] == "NetworkPolicy"}
    pods = {"app.kubernetes.io/name": "pdcluster"}
    # every pdcluster pod is selected (so default-deny applies) and its peers may reach it
    internal = policies["pdcluster-internal"]
    assert internal["podSelector"]["matchLabels"] == pods
    assert internal["ingress"] == [{"from": [{"podSelector": {"matchLabels": pods}}]}]
    # what anyone else may reach: the API and metrics on the head, never Ray's or the store's ports
    api = policies["pdcluster-api"]
    open_to_all = {p["port"] for rule in api["ingress"] if "from" not in rule for p in rule["ports"]}
    assert open_to_all == {PROD.serve.http_port, PROD.serve.grpc_port, 8080}
    store = PROD.store
    internal_only = {6379, 10001, store.rpc_port, store.metadata_port, store.metrics_port}
    reachable = {p["port"] for rule in api["ingress"] for p in rule["ports"]}
    assert not internal_only & reachable
