"""CPU kernels built on first use with the machine's C compiler, called through ctypes."""
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

from .layers.block_quant import QBLOCK, BlockWeights

# Only what the torch path cannot do well lives here: decode attention that reads the paged KV cache
# in place (csrc/paged_decode_attention.c), and decode-sized matmuls over weights kept in GGUF's
# 32-wide quantized blocks (csrc/block_linear.c, see block_quant.py). The library is compiled once per
# source, compiler and CPU (it uses -march=native) into a cache folder and shared by every process on
# the machine. No compiler, a failed build or `PDCLUSTER_CPU_KERNELS=0` leaves the portable torch path
# in charge, which is also the reference the kernels are tested against (tests/test_cpu_kernels.py).

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
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


def _build(compiler: str, name: str) -> Path:
    """csrc/<name>.c compiled into the cache (one library per source, so a source this machine's
    compiler or architecture cannot build leaves the other kernels in service)."""
    source = _CSRC / f"{name}.c"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), _cpu_flags().encode(),
                                      " ".join(_CFLAGS + _LIBS).encode()])).hexdigest()[:16]
    lib = _cache_dir() / f"{name}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP
    # thread pool for torch's ops and this kernel, so neither spins against the other.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        subprocess.run([compiler, *_CFLAGS, "-o", str(out), str(source), *_LIBS],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(out, lib)  # atomic: concurrent builders each land a complete file
    return lib


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
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


class BlockLinearKernel:
    """y = x W^T with W in GGUF blocks (block_quant.BlockWeights), for a few dozen rows of x: where
    BLAS streams the dense fp32 weight, this reads 4.5 / 8.5 bits per weight (csrc/block_linear.c)."""

    QTYPES = {"q4_1": 1, "q8_0": 2}

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn = lib.block_linear_f32
        fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
        fn.restype = None
        self._fn = fn
        self._scratch = lib.block_linear_scratch
        self._scratch.argtypes = [i64, i64, ctypes.c_int]
        self._scratch.restype = i64
        for name in ("qblock", "small_rows", "tile_rows"):
            getattr(lib, f"block_linear_{name}").restype = i64
        if lib.block_linear_qblock() != QBLOCK:
            raise AttributeError("block_linear.c and block_quant.py disagree on the block size")
        # fewest rows of x worth the kernel: from one row where it has its dot-product path (AVX-512
        # builds); otherwise its tiles would mostly multiply padding, and BLAS takes small batches
        self.min_rows = 1 if lib.block_linear_small_rows() else lib.block_linear_tile_rows() // 2

    def check(self, bw: BlockWeights) -> None:
        """Raise ValueError unless `bw` is laid out as the kernel reads it (checked once per layer,
        not per call)."""
        per_block = {"q4_1": QBLOCK // 2, "q8_0": QBLOCK}.get(bw.qtype)
        if per_block is None:
            raise ValueError(f"block format {bw.qtype!r} has no kernel")
        parts = [bw.qs, bw.d] + ([bw.m] if bw.qtype == "q4_1" else [])
        n, k = bw.shape if bw.d.dim() == 2 else (0, 0)
        if (n < 1 or k < 1 or bw.qs.shape != (n, k // QBLOCK, per_block)
                or bw.qs.element_size() != 1 or any(t is None for t in parts)
                or any(t.dtype != torch.float32 or t.shape != bw.d.shape for t in parts[1:])
                or any(not t.is_contiguous() or t.device.type != "cpu" for t in parts)):
            raise ValueError(f"{bw.qtype} blocks {tuple(bw.qs.shape)} are not in the kernel's layout")

    def __call__(self, bw: BlockWeights, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N]; `bw` must have passed `check`."""
        n, k = bw.shape
        if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"x must be a float32 CPU [rows, {k}] tensor, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        x = x.contiguous()
        rows, threads = x.shape[0], torch.get_num_threads()
        y = torch.empty(rows, n, dtype=torch.float32, device="cpu")
        if rows == 0:
            return y
        scratch = torch.empty(self._scratch(rows, k, threads), dtype=torch.float32, device="cpu")
        m = bw.m if bw.m is not None else bw.d
        self._fn(self.QTYPES[bw.qtype], x.data_ptr(), rows, k, bw.qs.data_ptr(), bw.d.data_ptr(),
                 m.data_ptr(), n, y.data_ptr(), scratch.data_ptr(), threads)
        return y


@functools.cache
def kernel_library(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c compiled and loaded, or None (then callers use the torch path). Built once
    per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.info("no C compiler found: the torch path runs decode attention and matmuls")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, name)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("CPU kernel %s unavailable, using the torch path: %s", name, detail)
        return None
    ours, torchs = openmp_runtimes(lib)
    if ours and torchs and ours != torchs:
        # torch's wheel brought its OpenMP under another name, so the kernel linked a second
        # runtime: two thread pools would spin against each other on the same cores
        log.warning("CPU kernel %s not used: its OpenMP runtime (%s) is not torch's (%s); using "
                    "the torch path", name, ours, torchs)
        return None
    return lib


def _wrap(cls, name: str):
    lib = kernel_library(name)
    if lib is None:
        return None
    try:
        return cls(lib)
    except AttributeError as exc:   # a library without this kernel's symbols
        log.warning("CPU kernel %s unavailable, using the torch path: %s", cls.__name__, exc)
        return None


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    return _wrap(PagedDecodeKernel, "paged_decode_attention")


@functools.cache
def block_linear_kernel() -> BlockLinearKernel | None:
    return _wrap(BlockLinearKernel, "block_linear")


def reset() -> None:
    """Forget the loaded kernels (tests switch them off and on)."""
    for cached in (kernel_library, paged_decode_kernel, block_linear_kernel):
        cached.cache_clear()


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
