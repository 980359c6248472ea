"""CPU kernels built on first use with the machine's C compiler, called through ctypes.

Only what the torch path cannot do without copies lives here: decode attention that reads the paged
KV cache in place (csrc/paged_decode_attention.c). The library is compiled once per source, compiler
and CPU (it uses -march=native) into a cache folder and shared by every process on the machine. No
compiler, a failed build or `PDCLUSTER_CPU_KERNELS=0` leaves the portable torch path in charge,
which is also the reference the kernel is tested against (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.c"
ENV_SWITCH = "PDCLUSTER_CPU_KERNELS"
ENV_CACHE = "PDCLUSTER_KERNEL_CACHE"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdcluster", "kernels")
    return Path(root)


_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_LIBS = ["-lmvec", "-lm"]


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_flags().encode(),
                                      " ".join(_CFLAGS + _LIBS).encode()])).hexdigest()[:16]
    lib = _cache_dir() / f"paged_decode_attention-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP
    # thread pool for torch's ops and this kernel, so neither spins against the other.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        subprocess.run([compiler, *_CFLAGS, "-o", str(out), str(_SOURCE), *_LIBS],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(out, lib)  # atomic: concurrent builders each land a complete file
    return lib


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        fn = lib.paged_decode_attention_f32
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64,
                       ctypes.c_float, ctypes.c_int]
        fn.restype = None
        self._fn = fn
        self._last_checked: tuple | None = None  # (tables, lens, shapes, their checked int64 copies)
        for name in ("max_group", "max_head_dim", "max_block"):
            getter = getattr(lib, f"paged_decode_{name}")
            getter.restype = i64
            setattr(self, name, getter())

    def supports(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        """fp32 q and cache on the CPU, an MHA/GQA cache ([blocks, layers, block, 2, kvh, d]) within
        the kernel's fixed limits."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or cache.dtype != torch.float32:
            return False
        return self._shape_problem(q, cache) is None

    def _shape_problem(self, q: torch.Tensor, cache: torch.Tensor) -> str | None:
        if cache.dim() != 6 or cache.shape[3] != 2 or not cache.is_contiguous():
            return "the cache is not a contiguous [blocks, layers, block, 2, kv_heads, head_dim] tensor"
        if q.dim() != 3 or q.shape[2] != cache.shape[5]:
            return "q is not [seqs, heads, head_dim] with the cache's head_dim"
        heads, kv_heads = q.shape[1], cache.shape[4]
        if heads % kv_heads or heads // kv_heads > self.max_group:
            return f"{heads} heads over {kv_heads} kv heads (at most {self.max_group} per kv head)"
        if cache.shape[5] > self.max_head_dim or cache.shape[2] > self.max_block:
            return f"head_dim {cache.shape[5]} / block {cache.shape[2]} above the kernel's limits"
        return None

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, layer: int,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q [num_seqs, heads, head_dim] -> attention output of the same shape."""
        if (problem := self._shape_problem(q, cache)) is not None or q.dtype != cache.dtype:
            raise ValueError(f"unsupported input: {problem or 'q and cache dtypes differ'}")
        if not 0 <= layer < cache.shape[1]:
            raise ValueError(f"layer {layer} outside the cache's {cache.shape[1]} layers")
        q = q.contiguous()
        tables, lens = self._checked_tables(block_tables, context_lens, q.shape[0], cache)
        out = torch.empty_like(q)
        _, num_layers, block_size, _, kv_heads, head_dim = cache.shape
        self._fn(q.data_ptr(), out.data_ptr(), cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                 lens.data_ptr(), q.shape[0], q.shape[1], kv_heads, head_dim, block_size,
                 num_layers, layer, scale, torch.get_num_threads())
        return out

    def _checked_tables(self, block_tables: torch.Tensor, context_lens: torch.Tensor, num_seqs: int,
                        cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 copies of the tables and lengths, checked to stay inside the cache. Every layer of a
        step passes the same two tensors, so they are checked once per step (the references held
        here keep them alive, so identity cannot match new tensors)."""
        last = self._last_checked
        if (last is not None and last[0] is block_tables and last[1] is context_lens
                and last[2] == (num_seqs, cache.shape)):
            return last[3]
        tables = block_tables.to(torch.int64).contiguous()
        lens = context_lens.to(torch.int64).contiguous()
        if tables.dim() != 2 or tables.shape[0] != num_seqs or lens.shape != (num_seqs,):
            raise ValueError("block_tables and context_lens need one row per query")
        if lens.numel() and (int(lens.max()) > tables.shape[1] * cache.shape[2] or int(lens.min()) < 0
                             or (tables.numel() and (int(tables.max()) >= cache.shape[0]
                                                     or int(tables.min()) < 0))):
            raise ValueError("a block table or context length points outside the cache")
        self._last_checked = (block_tables, context_lens, (num_seqs, cache.shape), (tables, lens))
        return tables, lens


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled kernel, or None (then callers use the torch path). Built once per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.info("no C compiler found: decode attention uses the torch path")
        return None
    try:
        kernel = PagedDecodeKernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("CPU decode-attention kernel unavailable, using the torch path: %s", detail)
        return None
    ours, torchs = openmp_runtimes(kernel.lib)
    if ours and torchs and ours != torchs:
        # torch's wheel brought its OpenMP under another name, so the kernel linked a second
        # runtime: two thread pools would spin against each other on the same cores
        log.warning("CPU decode-attention kernel not used: its OpenMP runtime (%s) is not torch's "
                    "(%s); using the torch path", ours, torchs)
        return None
    return kernel


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _defining_file(lib: ctypes.CDLL, symbol: str) -> str | None:
    """The file whose definition of `symbol` `lib` uses (dlsym searches lib and its dependencies)."""
    try:
        addr = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        dladdr = ctypes.CDLL(None).dladdr
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    if not addr or not dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def openmp_runtimes(lib: ctypes.CDLL) -> tuple[str | None, str | None]:
    """(the OpenMP runtime `lib` calls, the one torch's ops call); None where unknown."""
    libtorch = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        torch_lib = ctypes.CDLL(str(libtorch))   # already loaded: this only takes a handle
    except OSError:
        return _defining_file(lib, "GOMP_parallel"), None
    return _defining_file(lib, "GOMP_parallel"), _defining_file(torch_lib, "GOMP_parallel")
