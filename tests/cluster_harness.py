"""Helpers for the tests that run the served cluster on real Ray: a small spec on free ports, Serve
deployment and teardown, and a view of the router's state."""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdcluster.cluster.supervised_process import free_port
from pdcluster.cluster.spec import ClusterSpec

MODEL = "SmolLM2-135M-Instruct"
# HAProxy mode's other listeners, the same for every test cluster of a session: Serve reads them when
# Ray starts, and every test's Ray inherits them from the environment conftest sets (RAY_ENV).
PROXY_PORTS = {"haproxy_stats_port": free_port(), "haproxy_metrics_port": free_port(),
               "fallback_proxy_port": free_port()}


def small_spec(**sections: dict[str, Any]) -> ClusterSpec:
    """The embedded model on CPU with a small KV cache and store, one torch thread per worker, every
    port free; `sections` override spec sections key by key."""
    data: dict[str, dict[str, Any]] = {
        "engine": {"device": "cpu", "num_kv_blocks": 128, "threads": 1},
        "store": {"rpc_port": free_port(), "metadata_port": free_port(), "metrics_port": free_port(),
                  "global_segment_mib": 64, "local_buffer_mib": 16},
        "serve": {"http_port": free_port(), "grpc_port": free_port(), **PROXY_PORTS},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return ClusterSpec.from_dict(data)


def serve_cluster(spec: ClusterSpec) -> str:
    """Deploy pdcluster for `spec` on the Ray instance this process is connected to; returns the
    HTTP base URL once /health is ok."""
    from pdcluster.cluster.launch.deployment import deploy, http_url

    deploy(spec, timeout_s=300)
    return http_url(spec)


def assert_stream_equals_offline(base: str, llm, messages: list[dict], max_tokens: int = 32) -> None:
    """A greedy streamed chat completion from the cluster at `base` gives the engine's offline text."""
    import openai

    from pdcluster.engine.sampling import SamplingParams

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=max_tokens, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    offline = llm.generate([llm.chat_prompt(messages)], SamplingParams(temperature=0, max_tokens=max_tokens))
    assert text == offline[0].text


def stop_cluster() -> None:
    import ray
    from ray import serve

    from pdcluster.cluster.launch.deployment import teardown

    try:
        teardown()
    finally:
        serve.shutdown()
        ray.shutdown()


def router():
    import ray

    from pdcluster.actors.names import NAMESPACE, ROUTER_NAME

    return ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)


def controller():
    import ray

    from pdcluster.actors.names import CONTROLLER_NAME, NAMESPACE

    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


def snapshot():
    import ray

    return ray.get(router().snapshot.remote(), timeout=30)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.25) -> Any:
    """Poll until predicate() is truthy; returns its value, or fails showing the router's state."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout_s}s; router: {describe(snapshot())}"
            return value
        time.sleep(interval_s)


def describe(snap) -> str:
    workers = ", ".join(
        f"{w.info.worker_id}(healthy={w.healthy} assigned={w.assigned} "
        + (f"running={w.report.running_seqs} waiting={w.report.waiting_seqs} "
           f"free={w.report.free_blocks}/{w.report.total_blocks})" if w.report else "no report)")
        for w in snap.workers)
    return (f"in_flight={snap.in_flight} queued={snap.queued} rejected={snap.rejected_total} "
            f"workers: {workers}")


def idle(snap, since: float = 0.0) -> bool:
    """Nothing admitted or queued, and every live worker idle with all its KV blocks free, as its
    last report says, which it took at `since` (time.time()) or later."""
    return (snap.in_flight == 0 and snap.queued == 0 and all(
        w.report is not None and w.report.taken_at >= since and w.report.running_seqs == 0
        and w.report.waiting_seqs == 0 and w.report.free_blocks == w.report.total_blocks
        for w in snap.workers if w.healthy))


def wait_idle(timeout_s: float = 20.0):
    """Wait until the cluster is idle by reports every live worker took after this call (a report
    from before a request reached a worker is idle too); returns that snapshot."""
    since = time.time()
    return wait_for(lambda: s if idle(s := snapshot(), since) else None, timeout_s)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def stream_completion(base: str, prompt: str, max_tokens: int, out: list, started: threading.Event,
                      timeout_s: float = 180) -> None:
    """Stream a greedy completion of exactly max_tokens into `out`: the status, each SSE payload
    (decoded JSON, or "[DONE]"), or the HTTP error that ended it; `started` is set at the first."""
    import httpx

    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=timeout_s) as resp:
            out.append(resp.status_code)
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    out.append(data if data == "[DONE]" else json.loads(data))
                    started.set()
    except httpx.HTTPError as exc:
        out.append(exc)


def listener_command(port: int) -> str:
    """The command name of the process listening on TCP `port` (from /proc)."""
    return Path(f"/proc/{listener_pid(port)}/comm").read_text().strip()


def listener_pid(port: int) -> int:
    """The pid of the process listening on TCP `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    assert inodes, f"nothing listens on {port}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if inodes & {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}:
                return int(pid)
        except OSError:  # gone, or not ours to read
            continue
    raise AssertionError(f"no process of ours holds the socket on {port}")
