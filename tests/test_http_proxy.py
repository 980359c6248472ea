"""Serve's two HTTP proxies (`serve.http_proxy`): Serve's proxy actor (the default, which every other
cluster test runs on) and HAProxy in front of the ingress replica's own HTTP server, which gives the
same text (test_drain.py runs `pdcluster up` through it); a spec whose proxy is not the one its Ray
started with is refused, saying how to fix it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import cluster_harness as h
from pdcluster.cluster.launch.ray_env import HAPROXY_FLAG, http_proxy_in_effect, mismatch, ray_env
from pdcluster.cluster.spec import ClusterSpec

QUESTION = [{"role": "user", "content": "Name three rivers in Europe."}]


def test_ray_env_gives_each_mode_and_haproxys_own_ports() -> None:
    spec = ClusterSpec.from_dict({"serve": {"http_proxy": "haproxy", "haproxy_stats_port": 18404,
                                            "haproxy_metrics_port": 19101, "fallback_proxy_port": 18500}})
    env = ray_env(spec)
    assert env[HAPROXY_FLAG] == "1" and http_proxy_in_effect(env) == "haproxy"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"],
            env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) == ("18404", "19101", "18500")
    serve = ClusterSpec.from_dict({"serve": {"http_proxy": "serve"}})
    assert ray_env(serve) == {HAPROXY_FLAG: "0"} and http_proxy_in_effect(ray_env(serve)) == "serve"
    assert mismatch(spec, env) is None and mismatch(serve, ray_env(serve)) is None
    # a Ray started without the variable runs Serve's proxy
    problem = mismatch(spec, {})
    assert "serve.http_proxy is 'haproxy'" in problem and "pdcluster render ray-env" in problem
    assert "serve.http_proxy: serve" in problem
    # HAProxy's ports too (Ray would ignore the spec's); where a node keeps its files is its own
    moved = mismatch(spec, {**env, "RAY_SERVE_HAPROXY_STATS_PORT": "8404"})
    assert moved and "RAY_SERVE_HAPROXY_STATS_PORT=8404 (the spec: 18404)" in moved
    assert mismatch(spec, ray_env(spec, Path("/elsewhere"))) is None


def test_haproxys_files_live_in_a_folder_only_this_user_can_open(tmp_path, monkeypatch) -> None:
    """Ray makes HAProxy's admin socket mode 666; its folder is what keeps other users out."""
    from pdcluster.cluster.launch import ray_env as module

    # the default, under /tmp whatever $TMPDIR says, leaves HAProxy room for Ray's node folder
    assert len(f"{module.private_haproxy_dir()}/{'0' * 56}/metrics.sock") <= 97
    with pytest.raises(RuntimeError, match="longer than its 97"):
        module.private_haproxy_dir(tmp_path)   # pytest's folders are too deep for HAProxy
    # $XDG_RUNTIME_DIR (this user's own) where HAProxy's paths fit there, else /tmp
    import shutil
    import tempfile

    runtime = tempfile.mkdtemp(prefix="x", dir="/tmp")
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        assert module.private_haproxy_dir() == Path(runtime) / "pdc-haproxy"
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        assert module.private_haproxy_dir() == Path(f"/tmp/pdc-haproxy-{os.getuid()}")
    finally:
        shutil.rmtree(runtime)
    monkeypatch.setattr(module, "HAPROXY_MAX_SOCKET_PATH", 4096)
    folder = module.private_haproxy_dir(tmp_path)
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()
    env = ray_env(ClusterSpec.from_dict({"serve": {"http_proxy": "haproxy"}}), folder)
    assert {env["RAY_SERVE_HAPROXY_SOCKET_PATH"], env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"],
            env["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"]} == {
        f"{folder}/admin.sock", f"{folder}/haproxy.cfg", f"{folder}/metrics.sock"}
    assert module.private_haproxy_dir(tmp_path) == folder   # found again as it was left
    folder.chmod(0o755)                                     # say, made by someone else beforehand
    with pytest.raises(RuntimeError, match="mode 0700"):
        module.private_haproxy_dir(tmp_path)


def test_haproxys_ports_may_not_clash_and_are_free_in_serve_mode() -> None:
    with pytest.raises(ValueError, match="serve.haproxy_stats_port and serve.http_port both use port 8000"):
        ClusterSpec.from_dict({"serve": {"http_proxy": "haproxy", "haproxy_stats_port": 8000}})
    ClusterSpec.from_dict({"serve": {"haproxy_stats_port": 8000}})   # serve's proxy opens none


@pytest.mark.integration
@pytest.mark.slow
def test_haproxy_gives_the_same_text_and_a_mismatched_ray_is_refused(llm) -> None:
    import ray
    from ray import serve

    from pdcluster.cluster.launch.ray_env import this_machines_ray_env

    spec = h.small_spec(serve={"http_proxy": "haproxy"})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in this_machines_ray_env(spec).items():  # what `pdcluster up` does
            mp.setenv(name, value)
        ray.init(num_cpus=4, include_dashboard=False, resources={"pd_prefill": 1, "pd_decode": 1})
    try:
        with pytest.raises(RuntimeError, match="serve.http_proxy is 'serve' but this Ray cluster runs"):
            h.serve_cluster(h.small_spec())
        serve.shutdown()
        base = h.serve_cluster(spec)
        assert h.listener_command(spec.serve.http_port) == "haproxy"
        h.assert_stream_equals_offline(base, llm, QUESTION)
    finally:
        h.stop_cluster()
