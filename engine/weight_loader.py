"""Streams checkpoint tensors into a model's modules, each keeping its own tensor-parallel slice.

Models route HF tensor names to `Target`s (module, tensor, stacked piece, expert); `load_weights`
fills them and fails on anything left empty.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


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
