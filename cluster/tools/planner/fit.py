"""Calibration: read a vendor's closed-loop measurements (checked row by row) and fit the profile's few
free constants to them; everything else comes from the hardware and the model."""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .decode import DecodeLayout, DecodeModel
from .hardware import ASCEND_910B1, DEEPSEEK_R1, Hardware, ModelArch
from .prefill import PrefillModel
from .profile import HandoffModel, Profile, ProfileError

REQUIRED_COLUMNS = ("concurrency", "ttft_s", "tpot_ms")
CHECKED_COLUMNS = (*REQUIRED_COLUMNS, "input_len")  # must be positive numbers; others are kept if numeric


class MeasurementError(ValueError):
    """A measurements CSV that cannot be used; the message names the row or column."""


def read_measurements(path: str | Path) -> list[dict[str, float]]:
    """Rows of an evalscope-style CSV (comment lines start with '#'): concurrency, ttft_s, tpot_ms and an
    optional input_len, which must be positive numbers (the row is refused, by line number, otherwise);
    other numeric columns are kept, other text dropped."""
    with open(path, newline="") as f:
        lines = [(i, ln) for i, ln in enumerate(f, 1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise MeasurementError(f"{path}: no header and no rows")
    reader = csv.DictReader(ln for _, ln in lines)
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise MeasurementError(f"{path}: missing column {missing[0]!r} (header: {', '.join(header)})")
    rows = []
    for (lineno, _), row in zip(lines[1:], reader):
        parsed: dict[str, float] = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                if key in CHECKED_COLUMNS:
                    raise MeasurementError(f"{path}:{lineno}: {key}={value!r} is not a number") from None
                continue
            if key in CHECKED_COLUMNS and (not math.isfinite(parsed[key]) or parsed[key] <= 0):
                raise MeasurementError(f"{path}:{lineno}: {key}={value} must be a positive time or count")
        rows.append(parsed)
    if not rows:
        raise MeasurementError(f"{path}: no rows")
    return rows


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares y ~ x @ b with b >= 0 (negative costs are not physical): the best of
    every subset of columns whose unconstrained solution is non-negative."""
    best, best_err = np.zeros(x.shape[1]), math.inf
    n = x.shape[1]
    for mask in range(1, 2 ** n):
        cols = [j for j in range(n) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(x[:, cols] * weights[:, None], y * weights, rcond=None)
        if (sol < 0).any():
            continue
        b = np.zeros(n)
        b[cols] = sol
        err = float(np.sum((weights * (x @ b - y)) ** 2))
        if err < best_err:
            best, best_err = b, err
    return best


def fit_profile(rows: Sequence[Mapping[str, float]], input_len: int, output_len: int, *, hardware: Hardware,
                model: ModelArch, handoff: HandoffModel, name: str = "fitted", description: str = "",
                source: str = "", mfu: float = 0.3, kv_efficiency: float = 1.0, max_batch_seqs: int = 64,
                kv_blocks: int = 1024, block_size: int = 128, max_batch_tokens: int = 16384) -> Profile:
    """Fit four constants to colocated single-node closed-loop measurements at one input length (one row
    per concurrency c: ttft_s, tpot_ms).

    Every wave of c requests arrives together, is prefilled in one batch and decodes together, so
    TTFT(c) = prefill of c prompts, and TPOT(c) = the decode step at batch c with context averaging
    c x (input_len + output_len / 2). Prefill: step_ms and per_seq_ms by non-negative least squares on
    relative error after the FLOPs term (at the assumed mfu). Decode (TP replica): overhead_ms and
    1 / weight_efficiency likewise, after the KV-read term (at the assumed kv_efficiency), taking the
    measured steps as bound by reads (the fit's residuals show whether they are).
    """
    if len(rows) < 2:
        raise ValueError("need measurements at >= 2 concurrencies")
    c = np.array([r["concurrency"] for r in rows], dtype=float)
    tpot = np.array([r["tpot_ms"] for r in rows], dtype=float)
    ttft = np.array([r["ttft_s"] for r in rows], dtype=float) * 1000

    unit = PrefillModel(1.0, 1.0, mfu, max_batch_tokens)
    pre = [unit.cost([input_len] * int(ci), model, hardware) for ci in c]
    steps = np.array([p.steps for p in pre], dtype=float)
    pieces = np.array([p.overhead_ms - p.steps for p in pre])
    flops = np.array([p.matmul_ms + p.attention_ms for p in pre])
    step_ms, per_seq_ms = _nonneg_lstsq(np.c_[steps, pieces], ttft - flops, 1 / ttft)
    prefill = PrefillModel(round(float(step_ms), 3), round(float(per_seq_ms), 3), mfu, max_batch_tokens)

    layout = DecodeLayout.tp(hardware)
    ctx = c * (input_len + output_len / 2)
    probe = DecodeModel(0.0, 1.0, kv_efficiency)  # reads at full bandwidth: ms = bytes / HBM
    reads = [probe.cost(model, hardware, layout, int(ci), int(x)) for ci, x in zip(c, ctx)]
    weights_ms = np.array([r.static_reads_ms + r.expert_reads_ms for r in reads])
    kv_ms = np.array([r.kv_reads_ms for r in reads])
    overhead, inv_eff = _nonneg_lstsq(np.c_[np.ones_like(c), weights_ms], tpot - kv_ms, 1 / tpot)
    if inv_eff <= 0:
        raise ValueError("TPOT does not grow with the batch: cannot fit the weight-read efficiency")
    decode = DecodeModel(round(float(overhead), 3), round(float(1 / inv_eff), 4), kv_efficiency, mfu)

    fitted = {"prefill.step_ms": "fitted (TTFT)", "prefill.per_seq_ms": "fitted (TTFT)",
              "decode.overhead_ms": "fitted (TPOT)", "decode.weight_efficiency": "fitted (TPOT)"}
    sources = {
        **fitted,
        "prefill.mfu": f"assumed: matmuls reach {mfu:g} of peak TFLOP/s (with one input length it cannot "
                       "be told apart from the per-prompt overhead)",
        "prefill FLOPs": f"model: 2 x {model.active_params / 1e9:.1f}B active params per token + MLA "
                         "attention per (query, key) pair",
        "decode.kv_efficiency": f"assumed: KV-cache reads at {kv_efficiency:g} of HBM bandwidth",
        "decode.mfu": f"assumed: decode FLOPs at {mfu:g} of peak (the prefill's); reads and FLOPs overlap",
        "decode bytes": f"model: {model.weight_bytes:g} B per weight, {model.kv_bytes_per_token:.0f} B KV "
                        "per token, distinct routed experts E(1-(1-k/E)^T)",
        "hardware": hardware.source,
        "handoff": "assumed: KV over the inter-node network per chip, no contention",
        "max_batch_seqs, kv_blocks, block_size": "engine configuration",
    }
    tpot_fit = [decode.cost(model, hardware, layout, int(ci), int(x)).total_ms for ci, x in zip(c, ctx)]
    ttft_fit = [prefill.cost([input_len] * int(ci), model, hardware).total_ms for ci in c]
    fit_info = {
        "source": source, "input_len": input_len, "output_len": output_len,
        "concurrencies": [int(ci) for ci in c], "fitted": sorted(fitted),
        "tpot_rel_err": {int(ci): round(float(f / m - 1), 4) for ci, f, m in zip(c, tpot_fit, tpot)},
        "ttft_rel_err": {int(ci): round(float(f / m - 1), 4) for ci, f, m in zip(c, ttft_fit, ttft)},
    }
    return Profile(name, hardware, model, prefill, decode, handoff, max_batch_seqs=max_batch_seqs,
                   kv_blocks=kv_blocks, block_size=block_size, description=description, sources=sources,
                   fit=fit_info)


def migrate_format1(d: Mapping[str, object]) -> Profile:
    """A format-2 profile fitted to a format-1 profile's own curves at the concurrencies it was fitted
    on: TTFT(c) = base + per_token x c x input_len, TPOT(c) = base + coef x c^exponent + ctx_coef x c x
    (input_len + output_len / 2). Format 1 named no hardware or model: DeepSeek-R1 on 910B1 nodes."""
    try:
        pre, dec, fit = dict(d["prefill"]), dict(d["decode"]), dict(d.get("fit") or {})
        n_in, n_out = int(fit.get("input_len", 128)), int(fit.get("output_len", 512))
        rows = [{"concurrency": float(c),
                 "ttft_s": (pre["base_ms"] + pre["per_token_ms"] * c * n_in) / 1000,
                 "tpot_ms": dec["base_ms"] + dec["batch_coef_ms"] * c ** dec["batch_exponent"]
                 + dec["ctx_coef_ms"] * c * (n_in + n_out / 2)}
                for c in fit.get("concurrencies") or (1, 2, 4, 8, 16, 32)]
        return fit_profile(
            rows, n_in, n_out, hardware=ASCEND_910B1, model=DEEPSEEK_R1, handoff=HandoffModel(**d["handoff"]),
            name=str(d.get("name", "migrated")), description=str(d.get("description", "")),
            source=f"format-1 profile's curves (fitted on {fit.get('source', 'unknown')})",
            max_batch_seqs=int(d.get("max_batch_seqs", 64)), kv_blocks=int(d.get("kv_blocks", 1024)),
            block_size=int(d.get("block_size", 128)), max_batch_tokens=int(pre.get("max_batch_tokens", 16384)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"format-1 profile cannot be migrated: {exc!r}") from None
