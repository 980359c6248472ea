"""ClusterSpec: loading, round-trips, clear errors for bad specs, and the views derived from it.

Pure Python: no Ray, no processes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pdcluster.cluster.spec import ClusterSpec, SpecError

REPO = Path(__file__).resolve().parents[1]

NPU8 = {"engine": {"device": "npu", "tp_size": 8},
        "prefill": {"accelerators_per_node": 8}, "decode": {"accelerators_per_node": 8}}


def test_default_is_embedded_model_on_cpu_one_worker_per_pool() -> None:
    spec = ClusterSpec.default()
    assert spec.model.path == "embedded" and spec.engine.device == "cpu"
    assert (spec.prefill.replicas, spec.decode.replicas) == (1, 1)
    assert spec.store.bind_host == "127.0.0.1" and spec.serve.http_host == "127.0.0.1"
    assert spec.model.served_name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("spec", [ClusterSpec.default(), ClusterSpec.from_yaml(REPO / "deploy/spec.yaml")],
                         ids=["default", "production"])
def test_dict_and_yaml_round_trip(spec: ClusterSpec) -> None:
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
    assert ClusterSpec.from_dict(yaml.safe_load(spec.to_yaml())) == spec


def test_spec_local_yaml_is_the_default_spec() -> None:
    assert ClusterSpec.from_yaml(REPO / "deploy/spec-local.yaml") == ClusterSpec.default()


def test_production_spec_shape() -> None:
    spec = ClusterSpec.from_yaml(REPO / "deploy/spec.yaml")
    assert spec.engine.device == "npu" and spec.engine.tp_size == 8
    assert (spec.prefill.replicas, spec.decode.replicas) == (2, 4)
    assert spec.prefill.accelerators_per_node == spec.decode.accelerators_per_node == 8
    assert spec.router.max_concurrency == 32
    assert spec.node_resources("prefill") == {"pd_prefill": 1, "NPU": 8}
    assert spec.node_resources("decode") == {"pd_decode": 1, "NPU": 8}
    assert spec.serve.api_keys_env  # the API listens on 0.0.0.0 there, so it must require keys


def test_pool_role_resource_defaults_by_position() -> None:
    spec = ClusterSpec.from_dict({"prefill": {"replicas": 2}, "decode": {"replicas": 3}})
    assert (spec.prefill.role_resource, spec.decode.role_resource) == ("pd_prefill", "pd_decode")


def test_misspelt_key_names_the_field_and_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("prefill:\n  replcas: 2\n")
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_yaml(path)
    msg = str(err.value)
    assert "prefill.replcas" in msg and "did you mean 'replicas'" in msg and str(path) in msg


def test_remote_code_cannot_be_enabled() -> None:
    with pytest.raises(SpecError, match="model.trust_remote_code: unknown field"):
        ClusterSpec.from_dict({"model": {"trust_remote_code": True}})


@pytest.mark.parametrize("data, needle", [
    ({**NPU8, "engine": {"device": "npu", "tp_size": 3}}, "tp_size=3 must divide prefill.accelerators_per_node=8"),
    ({"engine": {"device": "npu"}}, "prefill.accelerators_per_node must be >= 1"),
    ({"prefill": {"accelerators_per_node": 8}}, "needs engine.device npu or cuda"),
    ({"decode": {"replicas": 0}}, "decode.replicas"),
    ({"serve": {"grpc_port": 50051}}, "store.rpc_port and serve.grpc_port both use port 50051"),
    ({"engine": {"device": "cuda"}, "prefill": {"accelerators_per_node": 1},
      "decode": {"accelerators_per_node": 1}}, "needs store.protocol rdma"),
    ({"store": {"protocol": "rdma"}}, "needs device_name"),
    ({"store": {"protocol": "ascend"}}, "store.protocol 'ascend' needs engine.device 'npu'"),
    ({"prefill": {"role_resource": "pd_decode"}}, "distinct role_resource"),
    ({"engine": {"num_kv_blocks": 100, "kv_cache_gib": 2}}, "not both"),
    ({"engine": {"block_size": 24}}, "power of two"),
    ({"engine": {"tp_size": 2, "core": "process"}}, "core 'process' needs tp_size 1"),
    ({"engine": {"core": "subprocess"}}, "engine.core"),
    ({"engine": {"kv_cache_dtype": "fp8"}}, "engine.kv_cache_dtype"),
    ({"serve": {"api_keys_env": "sk-live-123"}}, "name of an environment variable"),
    ({"serve": {"cors_allowed_origins": ["https://ui.example.com/"]}}, "no path"),
    ({"serve": {"cors_allowed_origins": ["ui.example.com"]}}, "scheme://host"),
    ({"serve": {"cors_allowed_origins": ["https://UI.example.com"]}}, "as a browser sends it"),
    ({"serve": {"cors_allowed_origins": ["https://ui.example.com:443"]}}, "no default port"),
    ({**NPU8, "decode": {"accelerators_per_node": 8, "resources": {"NPU": 16}}}, "must not set ['NPU']"),
    ({"engine": {"device": "tpu"}}, "engine.device"),
    ({"serve": {"http_port": 70000}}, "serve.http_port"),
    ({"router": {"per_key_limits": {"tenant-a": 0}}}, "per-key limits must be >= 1"),
    ({"store": {"client": "shared"}}, "store.client"),
    ({"store": {"node_client_transfer_port": 40000}}, "node_client_transfer_port must be in 1024-32767"),
    ({**NPU8, "engine": {"device": "npu"}, "store": {"client": "node"}},
     "store.client 'node' shares host memory"),
    ({"engine": {"tp_size": 2}, "store": {"client": "node"}}, "store.client 'node' with engine.tp_size > 1"),
    ({"store": {"client": "node", "node_client_port": 50051}},
     "store.node_client_port and store.rpc_port both use port 50051"),
])
def test_invalid_specs_fail_with_a_message_naming_the_problem(data: dict, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_dict(data)
    assert needle in str(err.value)


def test_non_mapping_yaml_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        ClusterSpec.from_yaml(path)


def test_spec_is_immutable() -> None:
    spec = ClusterSpec.default()
    with pytest.raises(ValidationError):
        spec.engine.tp_size = 4  # type: ignore[misc]


@pytest.mark.parametrize("path, name, served", [
    ("embedded", None, "SmolLM2-135M-Instruct"),
    ("/models/DeepSeek-R1-AWQ/", None, "DeepSeek-R1-AWQ"),
    ("/weights/qwen3-0.6b.Q8_0.gguf", None, "qwen3-0.6b.Q8_0"),
    ("/models/DeepSeek-R1-AWQ", "deepseek-r1", "deepseek-r1"),
])
def test_served_model_name(path: str, name: str | None, served: str) -> None:
    assert ClusterSpec.from_dict({"model": {"path": path, "name": name}}).model.served_name == served


def test_store_addresses_and_ray_head_resolution() -> None:
    store = ClusterSpec.default().store
    assert store.master_address() == "127.0.0.1:50051"
    assert store.metadata_url() == "http://127.0.0.1:18080/metadata"
    head = ClusterSpec.from_dict({"store": {"master_host": "ray-head"}}).store
    assert head.master_address("10.1.2.3:6379") == "10.1.2.3:50051"
    assert head.metadata_url("10.1.2.3:6379") == "http://10.1.2.3:18080/metadata"
    with pytest.raises(ValueError, match="GCS address"):
        head.master_address()


def test_master_args_bind_every_listener_to_the_bind_host() -> None:
    args = ClusterSpec.from_dict({"store": {"bind_host": "10.0.0.10", "rpc_port": 6000}}).store.master_args()
    assert "--rpc_address=10.0.0.10" in args and "--rpc_port=6000" in args
    assert "--http_metadata_server_host=10.0.0.10" in args and "--metrics_host=10.0.0.10" in args
    assert "--enable_http_metadata_server=true" in args


def test_worker_actor_options_per_device() -> None:
    npu = ClusterSpec.from_yaml(REPO / "deploy/spec.yaml")
    opts = npu.worker_actor_options("decode")
    assert opts["resources"] == {"pd_decode": 1, "NPU": 8}
    assert opts["runtime_env"]["env_vars"]["HCCL_SOCKET_IFNAME"]
    cuda = ClusterSpec.from_dict({"engine": {"device": "cuda", "tp_size": 2},
                                  "prefill": {"accelerators_per_node": 2},
                                  "decode": {"accelerators_per_node": 4},
                                  "store": {"protocol": "rdma", "device_name": "mlx5_0"}})
    restarts = {"max_restarts": -1, "max_task_retries": 0}  # Ray restarts a dead worker
    assert cuda.worker_actor_options("decode") == {"resources": {"pd_decode": 1}, "num_gpus": 4,
                                                   **restarts}
    assert "NPU" not in cuda.node_resources("decode")
    assert ClusterSpec.default().worker_actor_options("prefill") == {"resources": {"pd_prefill": 1},
                                                                     **restarts}


def test_engine_config_carries_the_engine_fields() -> None:
    spec = ClusterSpec.from_dict({"model": {"dtype": "bfloat16", "max_model_len": 4096},
                                  "engine": {"device": "cpu", "tp_size": 2, "num_kv_blocks": 64,
                                             "max_num_seqs": 8, "threads": 2,
                                             "kv_cache_dtype": "float16"}})
    cfg = spec.engine_config(tp_rank=1)
    assert (cfg.model, cfg.device, cfg.dtype, cfg.kv_cache_dtype) == ("embedded", "cpu", "bfloat16", "float16")
    assert (cfg.tp_rank, cfg.tp_size, cfg.num_kv_blocks, cfg.max_num_seqs) == (1, 2, 64, 8)
    assert (cfg.max_model_len, cfg.threads) == (4096, 2)
    assert ClusterSpec.default().engine_config().kv_cache_dtype == "auto"


def test_state_file_lives_in_a_private_runtime_dir(tmp_path, monkeypatch):
    from pdcluster.cluster.launch import deployment

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = deployment.state_file()
    assert path.parent == tmp_path / "pdcluster" and path.parent.stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert deployment.state_file().parent == tmp_path / "home" / ".cache" / "pdcluster"
    (tmp_path / "shared").mkdir(mode=0o777)
    (tmp_path / "shared" / "pdcluster").mkdir()
    (tmp_path / "shared" / "pdcluster").chmod(0o777)  # a directory others can write is refused
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "shared"))
    with pytest.raises(RuntimeError, match="not be writable by others"):
        deployment.state_file()


def test_pool_shortfalls_name_the_pool_and_the_resource_its_nodes_lack():
    spec = ClusterSpec.from_dict({"prefill": {"replicas": 0}, "decode": {"replicas": 2}})
    assert spec.pool_shortfalls({"pd_decode": 2}) == []  # a colocated spec needs no prefill node
    (problem,) = spec.pool_shortfalls({"pd_prefill": 4, "pd_decode": 1})
    assert problem.startswith("decode pool wants 2 node(s) with resource 'pd_decode'")


def test_up_is_findable_by_down_while_it_starts_and_a_stop_then_tears_it_down(tmp_path, monkeypatch):
    # The endpoint answers before the deployment returns: a `down` sent then must find this process
    # (it once found no state file, said "no local pdcluster is running", and up served on). Up
    # still says where it served (requests sent from then on were answered), then tears down.
    import os
    import threading
    from types import SimpleNamespace

    import ray

    from pdcluster.cluster.launch import deployment

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    stop, events = threading.Event(), []
    monkeypatch.setattr(ray, "init", lambda **_: SimpleNamespace(address_info={"gcs_address": "127.0.0.1:1"}))
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("ray.shutdown"))

    def deploy(spec):
        state = deployment.read_state()
        events.append(("deploying, state pid", state.pid if state else None))
        stop.set()  # what `down`'s SIGTERM does

    monkeypatch.setattr(deployment, "deploy", deploy)
    monkeypatch.setattr(deployment, "teardown", lambda *a: events.append("teardown"))
    # not the main thread: no signal handlers are installed into pytest
    t = threading.Thread(target=deployment.up_local,
                         args=(ClusterSpec.default(), stop, lambda state: events.append("serving")))
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert events == [("deploying, state pid", os.getpid()), "serving", "teardown", "ray.shutdown"]
    assert deployment.read_state() is None  # removed once stopped
