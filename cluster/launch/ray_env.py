"""The environment Ray's processes must start with for a spec. Serve reads which proxy carries HTTP
(`serve.http_proxy`) from the environment when each of its processes starts, so the choice belongs to
the Ray cluster, not to the app: `pdcluster up` starts its Ray with it, the `ray up` configs and the
KubeRay manifest carry it, and the ingress refuses to serve on a Ray that runs the other mode.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..spec import ClusterSpec

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# How long a stopping ingress replica keeps serving after HAProxy is told to drop it. Ray's default
# (30 s) leaves time for an external load balancer to deregister it; Serve's own HAProxy reloads in
# well under a second, and the requests in flight are waited for whatever this says.
DEREGISTER_S = 2
# How long an HAProxy process replaced by a reload (a replica added or gone) keeps serving the streams
# it carries before it is killed. Ray's default, 120 s, would cut a long generation at any reload;
# this is HAProxy's idle limit for a client in Ray's config.
OLD_PROCESS_LIFETIME_S = 3600
HAPROXY_MAX_SOCKET_PATH = 97   # what HAProxy 2.8 accepts
NODE_ID_CHARS = 56             # Ray's node ids in hex


# Where HAProxy keeps its files: each node's own (ray_env's haproxy_dir), not compared across nodes.
PATH_VARIABLES = ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                  "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_FILE")


def ray_env(spec: ClusterSpec, haproxy_dir: Path | None = None) -> dict[str, str]:
    """The variables Ray's processes need for `spec` (on every node; the head is what uses them).
    `haproxy_dir`: where HAProxy keeps its files (Ray's default: a shared /tmp/haproxy-serve)."""
    s = spec.serve
    if s.http_proxy == "serve":
        return {HAPROXY_FLAG: "0"}
    env = {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(s.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(s.haproxy_metrics_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(s.fallback_proxy_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DEREGISTER_S),
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(OLD_PROCESS_LIFETIME_S),
    }
    if haproxy_dir is not None:  # Ray puts each file in a folder named after the node, in this one
        env |= {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{haproxy_dir}/haproxy.cfg",
                "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{haproxy_dir}/admin.sock",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{haproxy_dir}/metrics.sock",
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{haproxy_dir}/server-state"}
    return env


def this_machines_ray_env(spec: ClusterSpec) -> dict[str, str]:
    """`ray_env` for Ray processes started on this machine, by this user: in HAProxy mode its files
    go in this user's private folder (made if missing)."""
    return ray_env(spec, private_haproxy_dir() if spec.serve.http_proxy == "haproxy" else None)


def private_haproxy_dir(root: Path | None = None) -> Path:
    """This user's own folder for HAProxy's files on this machine. Ray makes HAProxy's admin socket
    mode 666 (whoever reaches it can re-route the API): a folder only this user can open keeps the
    machine's other users from reaching it. $XDG_RUNTIME_DIR (already this user's alone) where it is
    short enough, else /tmp, not $TMPDIR: HAProxy takes socket paths of at most 97 bytes, and Ray adds
    a 56-character node id and the socket's name."""
    if root is None:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and _fits(Path(runtime) / "pdc-haproxy"):
            return _private(Path(runtime) / "pdc-haproxy")
        root = Path("/tmp")
    folder = root / f"pdc-haproxy-{os.getuid()}"
    if not _fits(folder):
        raise RuntimeError(f"{folder}: HAProxy's sockets there would be longer than its "
                           f"{HAPROXY_MAX_SOCKET_PATH} bytes")
    return _private(folder)


def _fits(folder: Path) -> bool:
    return len(f"{folder}/{'0' * NODE_ID_CHARS}/metrics.sock") <= HAPROXY_MAX_SOCKET_PATH


def _private(folder: Path) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder} must be a folder of this user that only they can open "
                           "(mode 0700): another user may have made it; remove it")
    return folder


def http_proxy_in_effect(environ: Mapping[str, str] = os.environ) -> str:
    """The `serve.http_proxy` that the Ray processes started with `environ` run."""
    return "haproxy" if environ.get(HAPROXY_FLAG) == "1" else "serve"


def mismatch(spec: ClusterSpec, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why `spec` cannot be served by Ray processes started with `environ`; None if it can (where
    HAProxy keeps its files is the node's own business)."""
    running = http_proxy_in_effect(environ)
    fix = ("start Ray with the variables `pdcluster render ray-env` prints for this spec (Serve reads "
           "them only when its processes start)")
    if running != spec.serve.http_proxy:
        return (f"serve.http_proxy is {spec.serve.http_proxy!r} but this Ray cluster runs Serve's "
                f"{running!r} proxy ({HAPROXY_FLAG}={environ.get(HAPROXY_FLAG, 'unset')} where Ray "
                f"started): {fix}, or set serve.http_proxy: {running}")
    wrong = [f"{name}={environ.get(name, 'unset')} (the spec: {value})"
             for name, value in ray_env(spec).items()
             if name not in (HAPROXY_FLAG, *PATH_VARIABLES) and environ.get(name) != value]
    if wrong:
        return f"this Ray cluster started with {', '.join(wrong)}: {fix}"
    return None
