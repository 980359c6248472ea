"""Quantized linear weights: AWQ w4a16 (AutoAWQ GEMM layout) and compressed-tensors pack-quantized int.

A `LinearMethod` names the tensors a linear layer stores and multiplies with them. The methods here
are the portable reference (dequantize, then matmul); a fused NPU/GPU kernel is a subclass that keeps
`specs` (so loading and tensor-parallel slicing stay the same) and overrides `apply`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# AutoAWQ GEMM: nibble i (bits 4i..4i+3) of each int32 holds column AWQ_PACK_ORDER[i] of its 8.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ParamSpec:
    """One stored tensor of a linear layer (shapes are for this rank's [out, in] slice).

    Axis `out_axis` steps over output features `out_unit` at a time (8 where int4 is packed along
    the outputs), `in_axis`/`in_unit` likewise over input features (the group size for per-group
    scales). None: the tensor does not span that dimension.
    """
    shape: tuple[int, ...]
    dtype: torch.dtype
    out_axis: int | None
    out_unit: int = 1
    in_axis: int | None = None
    in_unit: int = 1


class LinearMethod:
    """Unquantized weights, `weight[out, in]`."""

    # checkpoint tensors that carry nothing to store (e.g. compressed-tensors' weight_shape)
    ignored: frozenset[str] = frozenset()

    def specs(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((out_features, in_features), torch.get_default_dtype(),
                                    out_axis=0, in_axis=1)}

    def dense_weight(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The [out, in] weight these tensors encode (dequantized for quantized methods)."""
        return w["weight"]

    def apply(self, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(w).to(x.dtype))


class AWQLinearMethod(LinearMethod):
    """AutoAWQ GEMM: qweight[in, out/8] and qzeros[in/g, out/8] int32, scales[in/g, out] fp16;
    weight[in, out] = (q - zero) * scale of its input group."""

    def __init__(self, group_size: int, bits: int = 4) -> None:
        if bits != 4:
            raise NotImplementedError(f"AWQ with {bits} bits: only 4-bit GEMM packing is supported")
        self.group_size = group_size
        self.bits = bits
        self.pack = 32 // bits

    def specs(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        p, g = self.pack, self.group_size
        if out_features % p:
            raise ValueError(f"AWQ needs output features divisible by {p}, got {out_features}")
        # g <= 0: one group over the whole input, scales/zeros are not split by input
        groups, in_axis, g = _input_groups(in_features, g if g > 0 else None, 0)
        return {
            "qweight": ParamSpec((in_features, out_features // p), torch.int32, 1, p, 0, 1),
            "qzeros": ParamSpec((groups, out_features // p), torch.int32, 1, p, in_axis, g),
            "scales": ParamSpec((groups, out_features), torch.float16, 1, 1, in_axis, g),
        }

    def dense_weight(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_awq(w["qweight"], w["qzeros"], w["scales"], self.bits).t()


class PackQuantizedLinearMethod(LinearMethod):
    """compressed-tensors `pack-quantized`, symmetric: weight_packed[out, in*bits/32] int32 (values
    offset to unsigned, packed in order along the input), weight_scale[out, in/g]."""

    ignored = frozenset({"weight_shape"})

    def __init__(self, group_size: int | None, bits: int, scale_dtype: torch.dtype) -> None:
        if 32 % bits:
            raise NotImplementedError(f"pack-quantized with {bits} bits")
        self.group_size = group_size       # None: one scale per output channel
        self.bits = bits
        self.pack = 32 // bits
        self.scale_dtype = scale_dtype

    def specs(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        p, g = self.pack, self.group_size
        if in_features % p:
            raise ValueError(f"pack-quantized needs input features divisible by {p}, "
                             f"got {in_features}")
        groups, in_axis, g = _input_groups(in_features, g, 1)
        return {
            "weight_packed": ParamSpec((out_features, in_features // p), torch.int32, 0, 1, 1, p),
            "weight_scale": ParamSpec((out_features, groups), self.scale_dtype, 0, 1, in_axis, g),
        }

    def dense_weight(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        q = unpack_int32(w["weight_packed"], self.bits)
        scale = w["weight_scale"].float()
        return q * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)


def _input_groups(in_features: int, group_size: int | None, axis: int) -> tuple[int, int | None, int]:
    """(number of input groups, the axis scales are split along by input, group size) for a layer
    quantized in groups of `group_size` inputs (None: one group, nothing split by input)."""
    if group_size is None:
        return 1, None, 1
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} input features")
    return in_features // group_size, axis, group_size


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   bits: int = 4) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> float32 weight [in, out] (the transpose of nn.Linear's)."""
    q = _unpack_awq(qweight, bits)
    z = _unpack_awq(qzeros, bits)
    group = q.shape[0] // z.shape[0]
    return ((q - z.repeat_interleave(group, dim=0)).float()
            * scales.float().repeat_interleave(group, dim=0))


def _unpack_awq(packed: torch.Tensor, bits: int) -> torch.Tensor:
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)      # [..., n, nibble i]
    # column j of each group of 8 sits in the nibble i with AWQ_PACK_ORDER[i] == j
    source = [AWQ_PACK_ORDER.index(j) for j in range(pack)]
    return nibbles[..., source].reshape(*packed.shape[:-1], packed.shape[-1] * pack)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors `pack_to_int32` inverse along the last axis: value k of each int32 sits at
    bits [k*bits, (k+1)*bits) and was stored with +2**(bits-1) added. Returns signed int32."""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], -1) - (1 << (bits - 1))


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class QuantConfig:
    """Which linear layers of a checkpoint are quantized, and how (from its quantization_config)."""
    kind: str = "none"                   # none | awq | pack-quantized
    bits: int = 4
    group_size: int | None = None
    not_converted: tuple[str, ...] = ()  # AWQ modules_to_not_convert: name substrings left dense
    targets: tuple[str, ...] = ()        # compressed-tensors: "Linear", exact names or "re:" patterns
    ignore: tuple[str, ...] = ()
    scale_dtype: str = "bfloat16"

    @classmethod
    def from_hf(cls, hf_config: dict) -> QuantConfig:
        qc = hf_config.get("quantization_config")
        if not qc:
            return cls()
        method = qc.get("quant_method")
        if method == "awq":
            if qc.get("version", "gemm").lower() != "gemm" or not qc.get("zero_point", True):
                raise NotImplementedError("AWQ: only the GEMM layout with zero points is supported")
            return cls("awq", int(qc.get("bits", qc.get("w_bit", 4))),
                       int(qc.get("group_size", qc.get("q_group_size", 128))),
                       not_converted=tuple(qc.get("modules_to_not_convert") or ()))
        if method == "compressed-tensors":
            return cls._compressed_tensors(qc, hf_config)
        raise NotImplementedError(f"quantization {method!r} is not supported (awq, compressed-tensors)")

    @classmethod
    def _compressed_tensors(cls, qc: dict, hf_config: dict) -> QuantConfig:
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise NotImplementedError("compressed-tensors: exactly one config group is supported")
        group = groups[0]
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        if (fmt != "pack-quantized" or w.get("type", "int") != "int" or not w.get("symmetric", True)
                or group.get("input_activations") or w.get("actorder") == "group"):
            raise NotImplementedError("compressed-tensors: only symmetric weight-only int "
                                      "pack-quantized (no activation order) is supported")
        strategy = w.get("strategy", "group")
        if strategy not in ("group", "channel"):
            raise NotImplementedError(f"compressed-tensors strategy {strategy!r}")
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
        return cls("pack-quantized", int(w.get("num_bits", 4)),
                   int(w["group_size"]) if strategy == "group" else None,
                   targets=tuple(group.get("targets") or ("Linear",)),
                   ignore=tuple(qc.get("ignore") or ()), scale_dtype=str(dtype))

    def linear_method(self, module_names: Sequence[str]) -> LinearMethod:
        """Method for a linear layer built from the checkpoint modules `module_names` (several when
        q/k/v or gate/up are stacked into one matmul; they must be quantized alike)."""
        quantized = {self._is_quantized(n) for n in module_names}
        if len(quantized) != 1:
            raise ValueError(f"{list(module_names)} are stacked but not quantized alike")
        if not quantized.pop():
            return LinearMethod()
        if self.kind == "awq":
            return AWQLinearMethod(self.group_size or -1, self.bits)
        return PackQuantizedLinearMethod(self.group_size, self.bits, _DTYPES[self.scale_dtype])

    def _is_quantized(self, name: str) -> bool:
        if self.kind == "awq":
            return not any(s in name for s in self.not_converted)
        if self.kind == "pack-quantized":
            return (any(_matches(t, name) for t in self.targets)
                    and not any(_matches(t, name) for t in self.ignore))
        return False


def _matches(target: str, name: str) -> bool:
    if target == "Linear":          # a class-name target: every linear layer
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name
