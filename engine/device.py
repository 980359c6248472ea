"""Device and dtype selection: npu when torch_npu imports and a device is present, else cuda, else cpu.

torch_npu is imported only here and only if installed. The cpu path is the tested reference;
npu/cuda paths run the same portable torch code (unverified on 910B hardware in CI).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception as exc:  # a broken CANN install must not take down cpu serving
        log.warning("torch_npu present but unusable: %s", exc)
        return False


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if npu_available():
            return torch.device("npu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "npu" and not npu_available():
        raise RuntimeError("device 'npu' requested but torch_npu is not installed or sees no NPU")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if name not in ("cpu", "cuda", "npu"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or npu")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep activation buffers in the process's heap between steps instead of returning them to the
    OS, where glibc's defaults unmap every buffer over a few MiB and the next step faults the same
    pages in again (on a VM that costs up to half of a long prefill step). Allocations under
    `mmap_threshold` (32 MiB is glibc's ceiling) come from the heap, and up to `trim_threshold` of
    free heap is kept. Process-wide; the same effect as running under tcmalloc or jemalloc.
    Returns whether glibc took the settings (False elsewhere, e.g. musl)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, 64 << 20)))
