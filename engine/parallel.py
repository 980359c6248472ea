"""Tensor parallelism inside a node: the process group, sharded linear/embedding layers, weight loading.

Column-parallel layers hold a slice of the output features, row-parallel ones a slice of the input
features and all-reduce their partial sums. Every layer copies its own slice out of the full
checkpoint tensor (quantized layouts included, see quant.ParamSpec), so each rank holds its share.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdcluster.engine.quant import LinearMethod, ParamSpec

log = logging.getLogger(__name__)

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1


_tp = TPGroup()


def get_tp() -> TPGroup:
    return _tp


def init_tensor_parallel(rank: int, size: int, device: torch.device,
                         timeout_s: float | None = None) -> TPGroup:
    """Join the node's TP group (torch.distributed over env:// MASTER_ADDR/MASTER_PORT; gloo on cpu,
    nccl on cuda, hccl on npu). Size 1 needs no process group. Idempotent for the same rank/size.

    timeout_s bounds the rendezvous and every collective: a rank whose peer hangs raises instead of
    waiting forever (None: torch's default, 30 min for gloo)."""
    global _tp
    if not 0 <= rank < size:
        raise ValueError(f"tp_rank {rank} is not in [0, {size})")
    if size > 1:
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, size):
                raise RuntimeError(f"torch.distributed is already set up as rank "
                                   f"{dist.get_rank()}/{dist.get_world_size()}, not {rank}/{size}")
        else:
            if "MASTER_PORT" not in os.environ:
                raise RuntimeError("tensor parallel needs MASTER_PORT (and MASTER_ADDR) in the env")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            # one accelerator per rank; "cuda"/"npu" then mean this rank's device (not verified
            # on NPU/GPU hardware here: CI runs the gloo path)
            if device.type == "cuda":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            elif device.type == "npu":
                torch.npu.set_device(rank % torch.npu.device_count())  # type: ignore[attr-defined]
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            dist.init_process_group(_BACKENDS[device.type], init_method="env://", rank=rank,
                                    world_size=size, timeout=timeout)
            log.info("tensor parallel rank %d/%d up (%s)", rank, size, _BACKENDS[device.type])
    _tp = TPGroup(rank, size)
    return _tp


def shutdown_tensor_parallel() -> None:
    """Leave the TP group cleanly: every rank reaches a barrier, then the group is destroyed (a
    process that exits with gloo's threads still running can abort its peers)."""
    global _tp
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _tp = TPGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp.size > 1:
        dist.all_reduce(x)
    return x


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Make every rank hold rank 0's x (e.g. sampled tokens, so unseeded sampling cannot diverge)."""
    if _tp.size > 1:
        dist.broadcast(x, src=0)
    return x


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (e.g. how many KV blocks every rank could load), so all
    ranks take the same decision; `device` is where the collective runs (this rank's cache)."""
    if _tp.size == 1:
        return value
    x = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (small metadata only)."""
    if _tp.size == 1:
        return [obj]
    out: list[Any] = [None] * _tp.size
    dist.all_gather_object(out, obj)
    return out


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


@dataclass(frozen=True)
class Shard:
    start: int   # first feature of the full checkpoint tensor held on this rank
    size: int


def split_evenly(size: int, what: str = "features") -> Shard:
    """This rank's equal share of `size`."""
    tp = _tp
    if size % tp.size:
        raise ValueError(f"{size} {what} do not split evenly over {tp.size} ranks")
    per = size // tp.size
    return Shard(tp.rank * per, per)


# ---------------------------------------------------------------------------- linear layers

class Linear(nn.Module):
    """y = x W^T over this rank's slice of W; stored as `method` says (dense or quantized).

    `out_shards` are the checkpoint tensors stacked into one matmul (q/k/v, gate/up), each with the
    slice of it held here. With `num_experts` every stored tensor gets a leading expert axis.
    """

    def __init__(self, in_shard: Shard, out_shards: Sequence[Shard], bias: bool = False,
                 method: LinearMethod | None = None, num_experts: int = 0) -> None:
        super().__init__()
        self.method = method or LinearMethod()
        self.in_shard = in_shard
        self.out_shards = tuple(out_shards)
        self.num_experts = num_experts
        self.out_features = sum(s.size for s in self.out_shards)
        self.in_features = in_shard.size
        self.specs = self.method.specs(self.out_features, self.in_features)
        if bias:
            self.specs["bias"] = ParamSpec((self.out_features,), torch.get_default_dtype(), 0)
        lead = (num_experts,) if num_experts else ()
        for name, spec in self.specs.items():
            # uninitialized: load_weights fills (and checks) every tensor
            self.register_parameter(name, nn.Parameter(
                torch.empty(lead + spec.shape, dtype=spec.dtype), requires_grad=False))
        self._loaded: set[tuple[str, int, int | None]] = set()

    def tensors(self, expert: int | None = None) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n) for n in self.specs if n != "bias"}
        return out if expert is None else {n: t[expert] for n, t in out.items()}

    def dense_weight(self, expert: int | None = None) -> torch.Tensor:
        """This rank's [out, in] weight, dequantized if stored quantized."""
        return self.method.dense_weight(self.tensors(expert))

    def apply_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.tensors(expert), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self.tensors(), x)
        return y if "bias" not in self.specs else y + self.bias

    @torch.no_grad()
    def load_shard(self, param: str, tensor: torch.Tensor, shard: int = 0,
                   expert: int | None = None) -> None:
        """Copy this rank's part of checkpoint tensor `param` of stacked piece `shard`."""
        spec = self.specs.get(param)
        if spec is None:
            if param in self.method.ignored:
                return
            raise KeyError(f"{type(self.method).__name__} layer has no tensor {param!r}")
        if (expert is None) != (not self.num_experts):
            raise KeyError(f"{param!r}: expert index {expert} for a layer of "
                           f"{self.num_experts} experts")
        dst = getattr(self, param).data
        if expert is not None:
            dst = dst[expert]
        src = tensor
        if spec.out_axis is not None:
            s = self.out_shards[shard]
            offset = sum(x.size for x in self.out_shards[:shard])
            src = _narrow(src, spec.out_axis, s.start, s.size, spec.out_unit, param)
            dst = _narrow(dst, spec.out_axis, offset, s.size, spec.out_unit, param)
        if spec.in_axis is not None:
            src = _narrow(src, spec.in_axis, self.in_shard.start, self.in_shard.size,
                          spec.in_unit, param)
        if src.shape != dst.shape:
            raise ValueError(f"{param!r}: checkpoint slice {tuple(src.shape)} does not fit "
                             f"{tuple(dst.shape)}")
        dst.copy_(src)
        self._loaded.add((param, shard, expert))

    def missing(self) -> list[str]:
        experts = range(self.num_experts) if self.num_experts else [None]
        return [f"{p}[shard {s}]" + ("" if e is None else f"[expert {e}]")
                for p in self.specs for s in range(len(self.out_shards)) for e in experts
                if (p, s, e) not in self._loaded]


def _narrow(t: torch.Tensor, axis: int, start: int, size: int, unit: int,
            what: str) -> torch.Tensor:
    if start % unit or size % unit:
        raise ValueError(f"{what}: features [{start}, {start + size}) do not fall on its "
                         f"{unit}-feature packing/group boundaries (TP size or stacked pieces)")
    return t.narrow(axis, start // unit, size // unit)


class ReplicatedLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 method: LinearMethod | None = None) -> None:
        super().__init__(Shard(0, in_features), [Shard(0, out_features)], bias, method)


class ColumnParallelLinear(Linear):
    """Output features split over the ranks; `out_features` lists the stacked pieces."""

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool = False,
                 method: LinearMethod | None = None, num_experts: int = 0) -> None:
        sizes = [out_features] if isinstance(out_features, int) else list(out_features)
        super().__init__(Shard(0, in_features), [split_evenly(n) for n in sizes], bias, method,
                         num_experts)


class QKVParallelLinear(Linear):
    """q, k, v stacked, split by heads; with fewer kv heads than ranks each kv head is replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, method: LinearMethod | None = None) -> None:
        tp = get_tp()
        q = split_evenly(num_heads, "attention heads")
        if num_kv_heads >= tp.size:
            kv = split_evenly(num_kv_heads, "kv heads")
        elif tp.size % num_kv_heads == 0:
            kv = Shard(tp.rank // (tp.size // num_kv_heads), 1)
        else:
            raise ValueError(f"{num_kv_heads} kv heads cannot be shared by {tp.size} ranks")
        self.num_heads, self.num_kv_heads = q.size, kv.size
        q_shard = Shard(q.start * head_dim, q.size * head_dim)
        kv_shard = Shard(kv.start * head_dim, kv.size * head_dim)
        super().__init__(Shard(0, hidden), [q_shard, kv_shard, kv_shard], bias, method)


class RowParallelLinear(Linear):
    """Input features split over the ranks; the partial products are summed by all-reduce (unless
    the caller sums several layers first, reduce_results=False) and the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 method: LinearMethod | None = None, num_experts: int = 0,
                 reduce_results: bool = True) -> None:
        super().__init__(split_evenly(in_features), [Shard(0, out_features)], bias, method,
                         num_experts)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self.tensors(), x)
        if self.reduce_results:
            y = all_reduce(y)
        return y if "bias" not in self.specs else y + self.bias


# ---------------------------------------------------------------------------- vocabulary

class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of vocabulary rows (the last range zero-padded)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        tp = get_tp()
        per = -(-vocab_size // tp.size)
        self.vocab_size = vocab_size
        self.start = tp.rank * per
        self.end = min(vocab_size, self.start + per)
        self.weight = nn.Parameter(torch.empty(per, hidden), requires_grad=False)
        self._loaded = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tp().size == 1:
            return F.embedding(ids, self.weight)
        here = (ids >= self.start) & (ids < self.end)
        x = F.embedding((ids - self.start) * here, self.weight) * here.unsqueeze(-1)
        return all_reduce(x)

    @torch.no_grad()
    def load_shard(self, param: str, tensor: torch.Tensor, shard: int = 0,
                   expert: int | None = None) -> None:
        if param != "weight" or tensor.shape[0] != self.vocab_size:
            raise ValueError(f"embedding tensor {param!r} {tuple(tensor.shape)} does not match "
                             f"the vocabulary of {self.vocab_size}")
        n = self.end - self.start
        self.weight[:n].copy_(tensor[self.start:self.end])
        self.weight[n:].zero_()
        self._loaded = True

    def missing(self) -> list[str]:
        return [] if self._loaded else ["weight"]


class ParallelLMHead(nn.Module):
    """Logits over this rank's vocabulary rows, gathered to the full vocabulary; may share the
    embedding's rows (tied weights)."""

    def __init__(self, vocab_size: int, hidden: int,
                 tied: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.tied = tied is not None
        self.rows = tied if tied is not None else VocabParallelEmbedding(vocab_size, hidden)
        self.vocab_size = vocab_size
        self.method = LinearMethod()   # how the rows multiply (a CPU kernel may take over)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply({"weight": self.rows.weight}, x)
        return all_gather(logits, dim=-1)[..., : self.vocab_size]

    def load_shard(self, param: str, tensor: torch.Tensor, shard: int = 0,
                   expert: int | None = None) -> None:
        self.rows.load_shard(param, tensor)

    def missing(self) -> list[str]:
        return [] if self.tied else self.rows.missing()


# ---------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor (or a piece of it) goes."""
    module: str              # our module path
    param: str               # tensor name inside it (weight, qweight, scales, ...)
    shard: int = 0           # stacked piece (q=0, k=1, v=2; gate=0, up=1)
    expert: int | None = None


Route = Callable[[str, torch.Tensor], Iterable[tuple[Target, torch.Tensor]]]


def stacked_target(name: str, stacked: dict[str, tuple[str, int]]) -> Target:
    """`a.b.q_proj.weight` -> Target("a.b.qkv_proj", "weight", 0) for stacked = {"q_proj": ("qkv_proj",
    0), ...}; other names map onto the module of the same path."""
    module, param = name.rsplit(".", 1)
    parent, _, leaf = module.rpartition(".")
    if leaf in stacked:
        ours, shard = stacked[leaf]
        return Target(f"{parent}.{ours}", param, shard)
    return Target(module, param)


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], route: Route) -> None:
    """Stream checkpoint tensors into `model` (each module keeps its own TP slice), check that every
    tensor was filled, then let modules derive what they precompute from weights (`after_load`)."""
    modules = dict(model.named_modules())
    plain: set[str] = set()
    for name, tensor in weights:
        for t, piece in route(name, tensor):
            module = modules.get(t.module)
            if module is None:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
            if hasattr(module, "load_shard"):
                try:
                    module.load_shard(t.param, piece, t.shard, t.expert)
                except (KeyError, ValueError) as e:
                    raise type(e)(f"checkpoint tensor {name!r}: {e.args[0]}") from e
                continue
            dst = getattr(module, t.param, None)
            if not isinstance(dst, torch.Tensor) or dst.shape != piece.shape:
                raise KeyError(f"checkpoint tensor {name!r} {tuple(piece.shape)} does not fit "
                               f"{t.module}.{t.param}")
            dst.data.copy_(piece)
            plain.add(f"{t.module}.{t.param}")
    missing = [f"{path}.{m}" for path, mod in modules.items() if hasattr(mod, "missing")
               for m in mod.missing()]
    for pname, _ in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if not hasattr(modules[owner], "load_shard") and pname not in plain:
            missing.append(pname)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    for mod in modules.values():
        if hasattr(mod, "after_load"):
            mod.after_load()
