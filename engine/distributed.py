"""Tensor parallelism inside a node: the process group and the collectives the layers call.

Every rank runs the same engine on its own device; `get_tp()` says which rank this is and how many.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

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


def min_each_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """`min_over_ranks` of each of `values` (the same length on every rank), in one collective."""
    if _tp.size == 1 or not values:
        return list(values)
    x = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return [int(v) for v in x.tolist()]


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
