"""Tensor-parallel linear and embedding layers: each rank holds its slice of the weight.

Column-parallel layers hold a slice of the output features, row-parallel ones a slice of the input
features and all-reduce their partial sums. Every layer copies its own slice out of the full
checkpoint tensor (quantized layouts included, see quant.ParamSpec), so each rank holds its share.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Shard, all_gather, all_reduce, get_tp, split_evenly
from .quant import LinearMethod, ParamSpec


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
