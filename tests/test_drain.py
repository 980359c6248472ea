"""Graceful drain through the real CLI: `pdcluster up` serves, `pdcluster down` (SIGTERM to it) stops
admitting at once (503 + Retry-After, /health says draining), lets a request in flight finish, stops
one that outlives the drain timeout with an error event (never a silently cut stream), then exits
leaving no process behind."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

import cluster_harness as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRAIN_TIMEOUT_S = 10.0
# output tokens: done well inside the drain timeout / never within it (a 2-core machine decodes one
# stream at ~100-200 tokens/s; 6000 tokens would take a machine 3x faster still 10 s past the drain)
SHORT, LONG = 16, 6000


def _cli(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Run a CLI verb; its output goes to `log` (a pipe nobody reads would block it)."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "pdcluster.cluster.cli.main", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def _logs(tmp: Path, down: subprocess.Popen) -> str:
    """What `down` and `up` said, for a failure's message."""
    said = [f"down (exit {down.poll()}): {(tmp / 'down.log').read_text()[-2000:]}",
            f"up: {(tmp / 'up.log').read_text()[-3000:]}"]
    driver = tmp / "pdcluster" / "up.log"  # Ray's and Serve's own lines in the up process
    if driver.exists():
        said.append(f"up's Ray lines: {driver.read_text()[-3000:]}")
    return "\n".join(said)


def _grpc_health(spec) -> str:
    """What gRPC's Health service says of the server as a whole."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{spec.serve.grpc_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)


def _stream(base: str, max_tokens: int, events: list, first: threading.Event) -> None:
    h.stream_completion(base, f"Count from {max_tokens}:", max_tokens, events, first, timeout_s=120)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`pdcluster up --config` in its own process (its own Ray), state file in a private runtime dir."""
    tmp = tmp_path_factory.mktemp("drain")
    # through HAProxy (serve.http_proxy: haproxy): the drain, the listeners, the teardown
    spec = h.small_spec(router={"drain_timeout_s": DRAIN_TIMEOUT_S}, serve={"http_proxy": "haproxy"},
                        engine={"num_kv_blocks": 400, "threads": 1})   # LONG's KV: 376 blocks
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TMPDIR"] = env["XDG_RUNTIME_DIR"] = str(tmp)
    proc = _cli("up", "--config", str(spec_file), env=env, log=tmp / "up.log")
    base = f"http://127.0.0.1:{spec.serve.http_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp / "up.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "pdcluster up did not become healthy"
            time.sleep(1)
        yield proc, base, env, tmp, spec
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _listening(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)  # the kernel prints each 32-bit word in host order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_http_and_grpc_listen_on_loopback_only(up):
    spec = up[-1]
    # `pdcluster up` gives its Ray the spec's proxy: HAProxy holds the HTTP port, its files in
    # this user's own folder (up's $XDG_RUNTIME_DIR is too deep for HAProxy's sockets: /tmp's)
    assert spec.serve.http_proxy == "haproxy" and h.listener_command(spec.serve.http_port) == "haproxy"
    args = Path(f"/proc/{h.listener_pid(spec.serve.http_port)}/cmdline").read_text().split("\0")
    config = Path(args[args.index("-f") + 1])
    assert config.parent.parent == Path(f"/tmp/pdc-haproxy-{os.getuid()}"), args
    assert (config.parent / "admin.sock").is_socket()
    assert config.parent.parent.stat().st_mode & 0o777 == 0o700
    for name, port in (("http", spec.serve.http_port), ("grpc", spec.serve.grpc_port)):
        addresses = _listening(port)
        assert addresses, f"nothing listens on the {name} port {port}"
        # grpc binds 127.0.0.1 as an IPv6 socket on ::ffff:127.0.0.1, the same loopback address
        assert all(_loopback(a) for a in addresses), (name, addresses)


def test_down_drains_in_flight_requests_then_exits(up):
    proc, base, env, tmp, spec = up
    short, long_ = [], []
    short_started, long_started = threading.Event(), threading.Event()
    threads = [threading.Thread(target=_stream, args=(base, LONG, long_, long_started)),
               threading.Thread(target=_stream, args=(base, SHORT, short, short_started))]
    threads[0].start()
    assert long_started.wait(120), long_
    threads[1].start()
    assert short_started.wait(120), short

    t0, since = time.monotonic(), time.strftime("%H:%M:%S")
    down = _cli("down", env=env, log=tmp / "down.log")
    # Draining: the health check turns away load balancers, new requests get 503 + Retry-After.
    # (`down` starts a Python process and signals `up`, which asks the router: about a second here;
    # generous for a loaded CI machine. A `down` sent before `up` had recorded itself used to be lost.)
    h_deadline = time.monotonic() + 90
    try:
        while (health := httpx.get(base + "/health", timeout=10)).status_code == 200:
            assert time.monotonic() < h_deadline, "never reported draining"
            time.sleep(0.2)
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        # gRPC's Health service says so too (within its refresh, a second)
        g_deadline = time.monotonic() + 10
        while (status := _grpc_health(spec)) == "SERVING" and time.monotonic() < g_deadline:
            time.sleep(0.2)
        assert status == "NOT_SERVING"
    except (AssertionError, httpx.HTTPError, grpc.RpcError) as exc:
        raise AssertionError(f"{exc!r} (down ran at {since})\n{_logs(tmp, down)}") from exc
    refused = httpx.post(base + "/v1/completions", timeout=30,
                         json={"model": h.MODEL, "prompt": "hi", "max_tokens": 4})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert int(refused.headers["Retry-After"]) >= 1

    for t in threads:
        t.join(DRAIN_TIMEOUT_S + 60)
    assert down.wait(DRAIN_TIMEOUT_S + 150) == 0, (tmp / "down.log").read_text()
    assert proc.wait(60) == 0, (tmp / "up.log").read_text()[-3000:]
    elapsed = time.monotonic() - t0

    # The short request finished normally while the cluster drained.
    assert short[0] == 200 and short[-1] == "[DONE]"
    chunks = [e for e in short[1:-1] if isinstance(e, dict)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The long one was stopped at the timeout, and told so in the stream (not cut off silently).
    assert long_[0] == 200 and long_[-1] == "[DONE]"
    errors = [e["error"] for e in long_[1:-1] if isinstance(e, dict) and "error" in e]
    assert [e["code"] for e in errors] == ["aborted"], long_[-3:]
    assert not any(c["choices"][0]["finish_reason"] for c in long_[1:-1] if "choices" in c)
    assert DRAIN_TIMEOUT_S - 1 < elapsed < DRAIN_TIMEOUT_S + 150
    # Nothing left behind: the state file is gone and no mooncake_master of ours runs.
    assert not (tmp / "pdcluster" / "up.json").exists()
    assert (tmp / "pdcluster").stat().st_mode & 0o777 == 0o700
    port = str(spec.store.rpc_port)
    masters = subprocess.run(["pgrep", "-af", "mooncake_master"], capture_output=True, text=True).stdout
    assert not [line for line in masters.splitlines() if port in line], masters
    # ...and no HAProxy of ours: HTTP, its stats page and its exporter are all let go
    for listener in (spec.serve.http_port, spec.serve.haproxy_stats_port, spec.serve.haproxy_metrics_port):
        assert not _listening(listener), listener


def test_up_prints_where_it_serves_and_keeps_routine_lines_in_the_logs_it_names(up):
    _, base, _, tmp, _ = up
    printed = (tmp / "up.log").read_text()
    assert f"OpenAI API: {base}/v1" in printed and f"{base}/health" in printed, printed
    logs = Path(re.search(r"workers: (\S+)", printed).group(1))
    assert any(logs.glob("worker-*")), logs  # the actors' own output is there
    # Mooncake's client lines at every start (and at `down`) and Serve's progress lines are not here
    for routine in ("metadata not found", "Failed to ping master", "Started Serve", "Deploying new version"):
        assert routine not in printed, printed[-3000:]
