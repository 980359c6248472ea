"""Bring a pdcluster up, down, and report on it: on this machine (a Ray instance owned by the `up`
process) or on an existing Ray cluster (`ray up`, KubeRay) given by its address.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..spec import ClusterSpec
from .ray_env import this_machines_ray_env
from .render import APP_NAME, serve_config

# Local mode: `up` starts Ray in-process on one node that carries both role resources, deploys the Serve
# app and keeps running until SIGINT/SIGTERM, then tears everything down (Serve, workers, the
# mooncake_master it started, Ray). It records itself in a state file so `down` (which signals it) and
# `status` (which connects to its Ray) work from another shell.

log = logging.getLogger(__name__)

STATE_NAME = "up.json"
READY_TIMEOUT_S = 900.0  # model loading on a big cluster takes minutes


@dataclass(frozen=True)
class UpState:
    pid: int  # the `pdcluster up` process that owns the local Ray instance (0: an existing cluster)
    ray_address: str
    http_url: str
    grpc_address: str
    model: str
    ray_auth_mode: str = "disabled"  # a new local Ray enables token auth (token in ~/.ray/auth_token)
    drain_timeout_s: float = 30.0  # how long `down` lets it finish the requests in flight


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    role: str
    node_ip: str
    healthy: bool
    running_seqs: int
    free_blocks: int
    total_blocks: int
    placed_total: int
    threads: int = 0  # the engine's torch threads
    most_threads: int = 0  # > threads: its steps take up to this many while the host's others idle
    # speculative decoding (engine totals)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per verification of drafts (accepted drafts + the model's own); None
        before any."""
        return 1 + self.spec_accepted_tokens / self.spec_verifications if self.spec_verifications else None


@dataclass(frozen=True)
class ClusterStatus:
    ray_address: str
    serve_status: str
    in_flight: int
    queued: int
    admitted_total: int
    rejected_total: dict[str, int]
    workers: list[WorkerStatus]
    master: dict[str, Any] | None


def _spec_totals(stats: dict[str, Any]) -> dict[str, int]:
    return {"spec_draft_tokens": stats.get("spec_draft_tokens_total", 0),
            "spec_accepted_tokens": stats.get("spec_accepted_tokens_total", 0),
            "spec_verifications": stats.get("spec_verifications_total", 0)}


def runtime_dir() -> Path:
    """This user's private directory for the state file: $XDG_RUNTIME_DIR/pdcluster, else
    ~/.cache/pdcluster, created mode 0700 (a shared /tmp would let another user plant a pid for
    `down` to signal). Refuses one that another user owns or others can write."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = (Path(base) if base else Path.home() / ".cache") / "pdcluster"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path} must belong to this user and not be writable by others")
    return path


def state_file() -> Path:
    return runtime_dir() / STATE_NAME


def read_state() -> UpState | None:
    try:
        return UpState(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    """The process exists and has not exited (an exited child its parent has not reaped yet is a
    zombie: signal 0 still reaches it, /proc says Z)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust the signal
    return stat.rpartition(")")[2].split()[0] != "Z"


def deploy(spec: ClusterSpec, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Deploy the Serve app for `spec` on the Ray cluster this process is connected to; returns once
    /health answers ok (the controller, the router, the master and every worker are up)."""
    import importlib

    from ray import serve

    # Apply exactly the Serve config that `pdcluster render serve-config` writes for `serve deploy`
    # and KubeRay's serveConfigV2: one source of truth, exercised by every cluster test.
    _check_redeploy(spec)
    config = serve_config(spec)
    serve.start(proxy_location=config["proxy_location"], http_options=config["http_options"],
                logging_config=config["logging_config"])
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        try:
            serve.run(builder(app["args"]), name=app["name"], route_prefix=app["route_prefix"],
                      logging_config=app["logging_config"])
        except RuntimeError as exc:
            # Serve's own message names the deployment only; the replica's error says why
            raise RuntimeError("\n".join([str(exc), *_deployment_errors(app["name"])])) from None
    wait_healthy(http_url(spec), timeout_s)


def _deployment_errors(app_name: str) -> list[str]:
    """Why the app's deployments failed, as Serve recorded it (a replica's exception)."""
    import ray
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except ray.exceptions.RayError:
        return []
    return [f"{name}: {d.message}" for name, d in (app.deployments if app else {}).items() if d.message]


def _check_redeploy(spec: ClusterSpec) -> None:
    """A cluster running here takes a redeploy's router and serve changes live; one that needs new
    workers is refused now, before Serve stops the replica that serves (its successor would fail)."""
    import ray

    from ...actors.names import CONTROLLER_NAME, NAMESPACE

    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    ClusterSpec.from_dict(ray.get(controller.spec_dict.remote(), timeout=30)).check_redeploy(spec)


def http_url(spec: ClusterSpec) -> str:
    host = "127.0.0.1" if spec.serve.http_host in ("0.0.0.0", "::") else spec.serve.http_host
    return f"http://{host}:{spec.serve.http_port}"


def grpc_address(spec: ClusterSpec) -> str:
    """Where gRPC answers: the HTTP host and the gRPC port (both bind serve.http_host)."""
    return f"{http_url(spec).removeprefix('http://').rpartition(':')[0]}:{spec.serve.grpc_port}"


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/health not ok after {timeout_s:.0f}s ({last})")


def drain(router, controller, timeout_s: float, force: threading.Event | None = None) -> int:
    """Stop admitting and give the admitted requests up to `timeout_s` (or until `force` is set) to
    finish; those still running then are stopped on their workers, and their clients get an error
    saying so. Returns how many had to be stopped."""
    import ray

    deadline = time.monotonic() + timeout_s
    in_flight = ray.get(router.drain.remote(), timeout=30)
    if in_flight:
        log.warning("draining: waiting up to %.0fs for %d request(s) in flight", timeout_s, in_flight)
    while in_flight and time.monotonic() < deadline and not (force and force.is_set()):
        time.sleep(0.2)
        in_flight = ray.get(router.snapshot.remote(), timeout=30).in_flight
    if not in_flight:
        return 0
    stopped = ray.get(controller.abort_all.remote(), timeout=30)
    log.warning("drain: stopped %d request(s) still running", stopped)
    deadline = time.monotonic() + 10.0  # the ingress reports the stop and releases their slots
    while ray.get(router.snapshot.remote(), timeout=30).in_flight and time.monotonic() < deadline:
        time.sleep(0.2)
    return stopped


def teardown(drain_timeout_s: float | None = None, force: threading.Event | None = None) -> None:
    """Drain (the spec's `router.drain_timeout_s` unless given), then remove the app and every
    pdcluster actor (stopping the master they started) from the Ray cluster this process is
    connected to."""
    import ray
    from ray import serve

    from ...actors.names import CONTROLLER_NAME, NAMESPACE, ROUTER_NAME

    def named(name: str):
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    log.warning("stopping: draining, then removing the app and the cluster's actors")
    controller, router = named(CONTROLLER_NAME), named(ROUTER_NAME)
    if controller is not None and router is not None:
        try:
            if drain_timeout_s is None:
                spec = ClusterSpec.from_dict(ray.get(controller.spec_dict.remote(), timeout=30))
                drain_timeout_s = spec.router.drain_timeout_s
            drain(router, controller, drain_timeout_s, force)
        except ray.exceptions.RayError as exc:
            log.warning("drain failed (tearing down anyway): %s", exc)
    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # Serve not running there: nothing to delete
        log.info("no Serve app to delete: %s", exc)
    if controller is None:
        return
    try:
        ray.get(controller.shutdown.remote(), timeout=60)
    except ray.exceptions.RayError as exc:
        log.warning("controller shutdown failed: %s", exc)
    ray.kill(controller)


def up_local(spec: ClusterSpec, stop: threading.Event, on_ready=None, on_started=None,
             verbose: bool = False) -> None:
    """Run the cluster on this machine until `stop` is set: `on_started(log_dir)` is called once Ray
    runs (the folder that holds every actor's log), `on_ready(state)` once it serves. The actors'
    own output (Serve's, Mooncake's, the workers') stays in those logs unless `verbose`."""
    import ray

    from ...actors.names import NAMESPACE

    state = read_state()
    if state is not None and state.pid and _pid_alive(state.pid):
        raise RuntimeError(f"a local pdcluster is already running (pid {state.pid}, {state.http_url}); "
                           "stop it with `pdcluster down`")
    resources = {spec.prefill.role_resource: 1, spec.decode.role_resource: 1,
                 **spec.prefill.resources, **spec.decode.resources}
    os.environ.update(this_machines_ray_env(spec))   # Ray's processes inherit it
    # address="local": always a new Ray instance of our own, never a `ray start` cluster that happens
    # to run on this machine (that is what --address is for).
    ctx = ray.init(address="local", namespace=NAMESPACE, resources=resources,
                   num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                   logging_level=logging.WARNING, log_to_driver=verbose)
    if on_started is not None:
        on_started(os.path.join(ctx.address_info["session_dir"], "logs"))
    force = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # After ray.init, which installs its own handlers: SIGTERM (`pdcluster down`) and Ctrl-C
        # both mean "drain, then tear down cleanly" (the mooncake_master child is never orphaned);
        # a second one cuts the drain short.
        def on_signal(*_: Any) -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    try:
        # Written before deploying, not once it serves: the endpoint answers as soon as Serve's app
        # is up, and a `down` sent from then on (or during the start-up) must find this process to
        # signal (it then stops as soon as the deployment returns).
        state = UpState(pid=os.getpid(), ray_address=ctx.address_info["gcs_address"],
                        http_url=http_url(spec), grpc_address=grpc_address(spec),
                        model=spec.model.served_name,
                        ray_auth_mode=os.environ.get("RAY_AUTH_MODE", "disabled"),
                        drain_timeout_s=spec.router.drain_timeout_s)
        state_file().write_text(json.dumps(asdict(state)))
        deploy(spec)
        # said even when a stop came during the start-up (then the teardown follows at once): the
        # endpoint has answered since Serve's app came up, and whoever sent requests then was served
        if on_ready is not None:
            on_ready(state)
        # Polled, not stop.wait(): the signal handler sets `stop` on this thread, and would deadlock
        # on the event's lock were it to interrupt wait() while wait() holds it.
        while not stop.is_set():
            time.sleep(0.2)
    finally:
        try:
            teardown(spec.router.drain_timeout_s, force)
        finally:
            # Stopping this Ray instance stops Serve's controller and proxies with it (the app and
            # our actors are gone already); serve.shutdown() would only add a raylet line saying
            # its controller's last task "will be retried".
            ray.shutdown()
            current = read_state()
            if current is not None and current.pid == os.getpid():
                state_file().unlink(missing_ok=True)


def up_remote(spec: ClusterSpec, address: str, verbose: bool = False) -> UpState:
    """Deploy onto an existing Ray cluster (its nodes carry the role resources) and return; the
    actors' own output stays in the cluster's logs unless `verbose`."""
    import ray

    from ...actors.names import NAMESPACE

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=verbose)
    for problem in spec.pool_shortfalls(ray.cluster_resources()):
        log.error("%s", problem)  # said here too: the controller's own line stays in its log
    try:
        deploy(spec)
        return UpState(pid=0, ray_address=address, http_url=http_url(spec),
                       grpc_address=grpc_address(spec),
                       model=spec.model.served_name)
    finally:
        ray.shutdown()


def down(address: str | None = None, timeout_s: float = 120.0) -> str:
    """Stop the local cluster (signal its `up` process: it drains, then tears down), or drain and
    tear pdcluster off the cluster at `address`. Waits `timeout_s` beyond the drain timeout.
    Returns what was done."""
    import ray

    from ...actors.names import NAMESPACE

    if address is None:
        state = read_state()
        if state is None or not state.pid or not _pid_alive(state.pid):
            state_file().unlink(missing_ok=True)
            return "no local pdcluster is running"
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + state.drain_timeout_s + timeout_s
        while _pid_alive(state.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pdcluster up (pid {state.pid}) still running after {timeout_s:.0f}s")
            time.sleep(0.5)
        return f"stopped the local pdcluster (pid {state.pid})"
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    try:
        teardown()
    finally:
        ray.shutdown()
    return f"removed pdcluster from the Ray cluster at {address}"


def status(address: str | None = None) -> ClusterStatus:
    """Connect to the cluster (the local one by default) and report its router's view."""
    if address is None:
        state = read_state()
        if state is None or (state.pid and not _pid_alive(state.pid)):
            raise RuntimeError("no local pdcluster is running (start one with `pdcluster up`)")
        address = state.ray_address
        # Ray turns token auth on by itself only for clusters it discovers, and reads the mode when
        # it is imported: ours is named by address, so say it here, before the import below.
        os.environ.setdefault("RAY_AUTH_MODE", state.ray_auth_mode)
    import ray
    from ray import serve

    from ...actors.names import CONTROLLER_NAME, NAMESPACE, ROUTER_NAME

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    try:
        try:
            app = serve.status().applications.get(APP_NAME)
            serve_status = getattr(app.status, "value", app.status) if app else "NOT DEPLOYED"
        except Exception as exc:
            serve_status = f"unknown ({exc})"
        try:
            router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(f"no pdcluster cluster on the Ray cluster at {address}") from None
        snap = ray.get(router.snapshot.remote(), timeout=30)
        master = ray.get(controller.master_status.remote(), timeout=30)
        workers = [WorkerStatus(
            worker_id=w.info.worker_id, role=w.info.role, node_ip=w.info.node_ip, healthy=w.healthy,
            running_seqs=w.report.running_seqs if w.report else 0,
            free_blocks=w.report.free_blocks if w.report else 0,
            total_blocks=w.info.num_total_blocks, placed_total=w.placed_total, threads=w.info.threads,
            most_threads=w.info.most_threads,
            **_spec_totals(w.report.stats if w.report else {})) for w in snap.workers]
        return ClusterStatus(ray_address=address, serve_status=str(serve_status),
                             in_flight=snap.in_flight, queued=snap.queued,
                             admitted_total=snap.admitted_total, rejected_total=snap.rejected_total,
                             workers=workers, master=asdict(master) if master else None)
    finally:
        ray.shutdown()
