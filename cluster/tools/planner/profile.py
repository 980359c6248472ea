"""The planner's profile: hardware, model, fitted step-time constants, the decode alternatives and the
KV handoff, read from and written to YAML with every field checked."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .decode import DECODE_PARALLEL, DecodeLayout, DecodeModel, Speculative
from .hardware import Hardware, ModelArch
from .prefill import PrefillModel

PROFILE_FORMAT = 2

# Fields that divide or count: zero is as wrong as negative.
_POSITIVE = {"chips_per_node", "peak_tflops", "hbm_gb_s", "inter_node_gb_s", "intra_node_gb_s", "mfu",
             "max_batch_tokens", "weight_efficiency", "kv_efficiency", "bandwidth_gb_s", "layers",
             "hidden", "routed_experts", "experts_per_token", "weight_bytes", "max_batch_seqs", "kv_blocks",
             "block_size", "k"}


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the field."""


class Format1Profile(ProfileError):
    """A profile in the old format (empirical batch^exponent decode curve); `data` holds it for
    `fit.migrate_format1`."""

    def __init__(self, message: str, data: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True)
class HandoffModel:
    """KV handoff prefill -> store -> decode: latency + prompt bytes / bandwidth (per TP rank, ranks in
    parallel); transfers do not contend with each other."""

    bytes_per_token: float
    bandwidth_gb_s: float
    latency_ms: float

    def time_s(self, tokens: int) -> float:
        return self.latency_ms / 1000 + tokens * self.bytes_per_token / (self.bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class Profile:
    """Performance model of the serving nodes: one node = hardware.chips_per_node chips. The decode
    alternatives (TP replica or EP pool, speculation) share the fitted constants; `decode_parallel`,
    `attn_tp` and `speculative` are the defaults the CLI can override."""

    name: str
    hardware: Hardware
    model: ModelArch
    prefill: PrefillModel
    decode: DecodeModel
    handoff: HandoffModel
    decode_parallel: str = "tp"
    attn_tp: int = 0  # EP pool's attention group size in ranks (0: one node)
    speculative: Speculative | None = None
    max_batch_seqs: int = 64  # engine's cap on sequences decoding at once per node
    kv_blocks: int = 1024  # KV blocks per node
    block_size: int = 128
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict)  # term -> fitted / published / assumed
    fit: Mapping[str, Any] = field(default_factory=dict)  # provenance and fit residuals

    def __post_init__(self) -> None:
        if self.decode_parallel not in DECODE_PARALLEL:
            raise ProfileError(f"decode_parallel: unknown decode model {self.decode_parallel!r} "
                               f"(one of {', '.join(DECODE_PARALLEL)})")

    def layout(self, decode_nodes: int) -> DecodeLayout:
        """The decode layout of a pool of `decode_nodes` nodes under this profile's choice."""
        if self.decode_parallel == "tp":
            return DecodeLayout.tp(self.hardware)
        return DecodeLayout.ep(self.hardware, decode_nodes, self.attn_tp or None)

    def with_decode(self, parallel: str | None = None, speculative: Speculative | None | bool = False,
                    attn_tp: int | None = None) -> Profile:
        """A copy with other decode choices (speculative=False keeps the profile's, None turns it off)."""
        return dataclasses.replace(
            self, decode_parallel=parallel or self.decode_parallel,
            speculative=self.speculative if speculative is False else speculative,
            attn_tp=self.attn_tp if attn_tp is None else attn_tp)

    @property
    def decode_label(self) -> str:
        label = self.decode_parallel
        if self.decode_parallel == "ep" and self.attn_tp:
            label += f" (attn TP{self.attn_tp})"
        return label + (f" {self.speculative.label}" if self.speculative else "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PROFILE_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Speculative):
                v = {"k": v.k, "acceptance": list(v.acceptance)}
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        if not isinstance(d, Mapping):
            raise ProfileError("profile: expected a mapping of fields")
        d = dict(d)
        version = d.pop("format", None)
        if version is None and isinstance(d.get("decode"), Mapping) and "batch_coef_ms" in d["decode"]:
            raise Format1Profile(
                "this is a format-1 profile (decode.batch_coef_ms: an empirical batch^exponent curve); "
                "format 2 models decode from weight and KV reads. Regenerate it from its measurements: "
                "pdcluster simulate --fit CSV --write-profile PATH", d)
        if version != PROFILE_FORMAT:
            raise ProfileError(f"format: expected {PROFILE_FORMAT}, got {version!r}")
        parts = {"hardware": Hardware, "model": ModelArch, "prefill": PrefillModel, "decode": DecodeModel,
                 "handoff": HandoffModel}
        for key, typ in parts.items():
            if key in d:
                d[key] = _build(typ, d[key], key)
        spec = d.get("speculative")
        if spec is not None:
            raw = _build(Speculative, spec, "speculative", construct=False)
            try:
                d["speculative"] = Speculative(int(raw["k"]), tuple(float(a) for a in raw["acceptance"]))
            except (TypeError, ValueError) as exc:
                raise ProfileError(f"speculative: {exc}") from None
        return _build(cls, d, "profile")


def _build(cls: type, d: Any, path: str, construct: bool = True) -> Any:
    """`cls(**d)` after checking: a mapping, no unknown or missing fields, numbers finite and >= 0
    (> 0 where they divide or count)."""
    if not isinstance(d, Mapping):
        raise ProfileError(f"{path}: expected a mapping of fields, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ProfileError(f"{path}.{unknown[0]}: unknown field (known: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProfileError(f"{path}.{missing[0]}: missing")
    for name, v in d.items():
        values = v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not math.isfinite(x) or x < 0 or (x == 0 and name in _POSITIVE):
                need = "> 0" if name in _POSITIVE else ">= 0"
                raise ProfileError(f"{path}.{name}: must be a finite number {need}, got {x}")
    if not construct:
        return d
    try:
        return cls(**d)
    except ProfileError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{path}: {exc}") from None


def load_profile(path: str | Path) -> Profile:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not YAML: {exc}") from None
    try:
        return Profile.from_dict(data)
    except Format1Profile as exc:
        raise Format1Profile(f"{path}: {exc}", exc.data) from None
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def save_profile(profile: Profile, path: str | Path) -> None:
    header = ("# Performance profile for `pdcluster simulate`; written by `pdcluster simulate --fit`.\n"
              "# Step-time models: cluster/tools/planner (prefill.py, decode.py); `sources` says which\n"
              "# constants are fitted and which come from published hardware figures or assumptions.\n")
    Path(path).write_text(header + yaml.safe_dump(profile.to_dict(), sort_keys=False))

