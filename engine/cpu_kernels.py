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
from .layers.interleaved_blocks import GROUP, InterleavedBlocks

# Only what the torch path cannot do well lives here: decode attention that reads the paged KV cache
# in place (csrc/paged_decode_attention.c), decode-sized matmuls over weights kept in GGUF's
# 32-wide quantized blocks (csrc/block_linear.c, see block_quant.py; csrc/integer_block_linear.c with
# the activations in 16- or 8-bit integers, see interleaved_blocks.py), and the per-layer small ops
# (norm, rotary, activation, KV write) fused into one call each (csrc/fused_ops.c). The library is compiled once per
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


def _build(compiler: str, name: str, source: Path | None = None) -> Path:
    """csrc/<name>.c (or `source`) compiled into the cache (one library per source, so a source this
    machine's compiler or architecture cannot build leaves the other kernels in service)."""
    source = source or _CSRC / f"{name}.c"
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


# the cache dtypes a kernel reads, by the suffix of its C function
CACHE_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _by_cache_dtype(lib: ctypes.CDLL, prefix: str, argtypes: list) -> dict[torch.dtype, object]:
    """`prefix`_f32/_f16/_bf16 of `lib` by the cache dtype each takes (those the compiler built:
    float16 needs x86 F16C for attention, _Float16 for the write); float32's must be there."""
    fns = {}
    for dtype, suffix in CACHE_DTYPES.items():
        name = f"{prefix}_{suffix}"
        fn = getattr(lib, name) if dtype == torch.float32 else getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = argtypes, None
            fns[dtype] = fn
    return fns


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fns = _by_cache_dtype(lib, "paged_decode_attention",
                                    [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64,
                                     ctypes.c_float, ctypes.c_int])
        self._last_checked: tuple | None = None  # (tables, lens, shapes, their checked int64 copies)
        for name in ("max_group", "max_head_dim", "max_block"):
            getter = getattr(lib, f"paged_decode_{name}")
            getter.restype = i64
            setattr(self, name, getter())

    def function_address(self, cache_dtype: torch.dtype) -> int | None:
        """The C function `__call__` calls for a cache of `cache_dtype` (None: none built)."""
        fn = self._fns.get(cache_dtype)
        return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value

    def supports(self, q: torch.Tensor, cache: torch.Tensor) -> bool:
        """fp32 q on the CPU, an MHA/GQA cache ([blocks, layers, block, 2, kvh, d]) of float32,
        float16 or bfloat16 within the kernel's fixed limits."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or cache.dtype not in self._fns:
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
        if (problem := self._shape_problem(q, cache)) is None and (
                q.dtype != torch.float32 or cache.dtype not in self._fns):
            problem = f"a {q.dtype} q over a {cache.dtype} cache"
        if problem is not None:
            raise ValueError(f"unsupported input: {problem}")
        if not 0 <= layer < cache.shape[1]:
            raise ValueError(f"layer {layer} outside the cache's {cache.shape[1]} layers")
        q = q.contiguous()
        tables, lens = self.checked_tables(block_tables, context_lens, q.shape[0], cache)
        out = torch.empty_like(q)
        _, num_layers, block_size, _, kv_heads, head_dim = cache.shape
        self._fns[cache.dtype](q.data_ptr(), out.data_ptr(), cache.data_ptr(), tables.data_ptr(),
                               tables.shape[1], lens.data_ptr(), q.shape[0], q.shape[1], kv_heads,
                               head_dim, block_size, num_layers, layer, scale, torch.get_num_threads())
        return out

    def checked_tables(self, block_tables: torch.Tensor, context_lens: torch.Tensor, num_seqs: int,
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
        self._scratch_sizes: dict[tuple[int, int, int], int] = {}   # (rows, k, threads) -> floats
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

    def scratch_floats(self, rows: int, k: int, threads: int) -> int:
        """Floats of scratch one call of `rows` rows over K = `k` on `threads` threads needs."""
        size = self._scratch_sizes.get((rows, k, threads))
        if size is None:
            size = self._scratch_sizes[rows, k, threads] = self._scratch(rows, k, threads)
        return size

    def function_address(self) -> int:
        """The C function `__call__` calls, for C code that calls it itself."""
        return ctypes.cast(self._fn, ctypes.c_void_p).value

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
        scratch = torch.empty(self.scratch_floats(rows, k, threads), dtype=torch.float32, device="cpu")
        m = bw.m if bw.m is not None else bw.d
        self._fn(self.QTYPES[bw.qtype], x.data_ptr(), rows, k, bw.qs.data_ptr(), bw.d.data_ptr(),
                 m.data_ptr(), n, y.data_ptr(), scratch.data_ptr(), threads)
        return y


class IntegerBlockLinearKernel(BlockLinearKernel):
    """y = x W^T with W in GGUF blocks interleaved 16 rows at a time (interleaved_blocks.py) and x
    quantized per block to `bits`-bit integers (csrc/integer_block_linear.c): `matmul_activations`
    int16 / int8."""

    def __init__(self, lib: ctypes.CDLL, bits: int) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn = getattr(lib, f"int{bits}_block_linear")
        fn.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
        fn.restype = None
        self._fn = fn
        self._scratch = getattr(lib, f"int{bits}_block_linear_scratch")
        self._scratch.argtypes = [i64, i64, ctypes.c_int]
        self._scratch.restype = i64
        self._scratch_sizes = {}
        for name in ("qblock", "group", "vnni"):
            getattr(lib, f"integer_block_linear_{name}").restype = i64
        if lib.integer_block_linear_qblock() != QBLOCK or lib.integer_block_linear_group() != GROUP:
            raise AttributeError("integer_block_linear.c and interleaved_blocks.py disagree on the layout")
        self.bits = bits
        self.vnni = bool(lib.integer_block_linear_vnni())   # else its portable (slow) path
        self.min_rows = 1

    def check(self, ib: InterleavedBlocks) -> None:
        """Raise ValueError unless `ib` is laid out as the kernel reads it."""
        per_group = {"q4_1": GROUP * QBLOCK // 2, "q8_0": GROUP * QBLOCK}.get(ib.qtype)
        if per_group is None or not isinstance(ib, InterleavedBlocks):
            raise ValueError(f"{ib!r:.60} is not a block format the integer kernel takes")
        groups, nb = -(-ib.n // GROUP), ib.k // QBLOCK
        parts = [ib.qs, ib.d] + ([ib.m] if ib.qtype == "q4_1" else [])
        if (ib.n < 1 or ib.k < 1 or ib.k % QBLOCK or ib.qs.shape != (groups, nb, per_group)
                or ib.qs.dtype != torch.uint8 or any(t is None for t in parts)
                or any(t.dtype != torch.float32 or t.shape != (groups, nb, GROUP) for t in parts[1:])
                or any(not t.is_contiguous() or t.device.type != "cpu" for t in parts)):
            raise ValueError(f"{ib.qtype} blocks {tuple(ib.qs.shape)} are not in the integer kernel's "
                             "layout")


class FusedOpsKernel:
    """RMSNorm, neox rotary, SiLU-and-mul and the MHA KV-cache write (into a float32, float16 or
    bfloat16 cache), each one C call on float32 CPU tensors of at most `max_rows` rows (decode
    steps and small chunks; bigger inputs are better served by torch's multithreaded ops). Each op returns None (or False) where its inputs are not
    ones it takes, and the caller runs the torch path."""

    max_rows = 256

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._norm = lib.rms_norm_f32
        self._norm.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr]
        self._silu = lib.silu_and_mul_f32
        self._silu.argtypes = [ptr, i64, i64, i64, ptr]
        self._rotary = lib.rotary_neox_f32
        self._rotary.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr]
        self._writes = _by_cache_dtype(lib, "write_kv",
                                       [ptr, ptr, i64, ptr, i64, i64, i64, ptr, ptr, i64, i64, i64])
        for fn in (self._norm, self._silu, self._rotary):
            fn.restype = None
        self._last_slots: tuple | None = None   # (blocks, offsets, cache shape) last checked

    def function_addresses(self, cache_dtype: torch.dtype) -> dict[str, int] | None:
        """The C functions its ops call (rms_norm, silu_and_mul, rotary, and write_kv into a cache of
        `cache_dtype`), for C code that calls them itself; None where no KV write for that dtype
        was built."""
        if cache_dtype not in self._writes:
            return None
        fns = {"rms_norm": self._norm, "silu_and_mul": self._silu, "rotary": self._rotary,
               "write_kv": self._writes[cache_dtype]}
        return {name: ctypes.cast(fn, ctypes.c_void_p).value for name, fn in fns.items()}

    def _rows_ok(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 2
                and x.stride(-1) == 1 and x.shape[-1] > 0 and 0 < x.numel() // x.shape[-1] <= self.max_rows)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """RMSNorm of x's rows (x 2-D with contiguous rows, or contiguous), or None where the torch
        path must run."""
        if (not self._rows_ok(x) or weight.dtype != torch.float32 or not weight.is_contiguous()
                or weight.shape != x.shape[-1:] or not (x.dim() == 2 or x.is_contiguous())):
            return None
        dim = x.shape[-1]
        rows = x.numel() // dim
        out = torch.empty(x.shape, dtype=torch.float32)
        self._norm(x.data_ptr(), rows, dim, x.stride(0) if x.dim() == 2 else dim, weight.data_ptr(),
                   eps, out.data_ptr())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """SiLU of the first half of each row times the second half ([T, 2n] -> [T, n])."""
        if not self._rows_ok(gate_up) or gate_up.dim() != 2 or gate_up.shape[1] % 2:
            return None
        rows, n = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, n, dtype=torch.float32)
        self._silu(gate_up.data_ptr(), rows, n, gate_up.stride(0), out.data_ptr())
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Neox rotary of x [T, heads, head_dim] by cos/sin [T, rot_dim] (contiguous float32), over
        the first rot_dim dims of each head."""
        if (not self._rows_ok(x) or x.dim() != 3 or cos.dtype != torch.float32
                or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape != sin.shape
                or cos.dim() != 2 or cos.shape[0] != x.shape[0] or cos.shape[1] % 2
                or cos.shape[1] > x.shape[2]):
            return None
        out = torch.empty(x.shape, dtype=torch.float32)
        self._rotary(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], x.stride(0), x.stride(1),
                     cos.data_ptr(), sin.data_ptr(), cos.shape[1], out.data_ptr())
        return out

    def write_kv(self, cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> bool:
        """k, v [T, kv_heads, head_dim] into their slots of an MHA cache [blocks, layers, block, 2,
        kv_heads, head_dim] of float32, float16 or bfloat16 (rounded as torch's .to() rounds); False
        (nothing written) where the torch path must do it. Raises ValueError for a slot outside the
        cache."""
        if (cache.dim() != 6 or cache.shape[3] != 2 or cache.dtype not in self._writes
                or not cache.is_contiguous() or cache.device.type != "cpu"
                or not 0 <= layer < cache.shape[1]):
            return False
        entry_shape = cache.shape[4:]
        for t in (k, v):
            if (not self._rows_ok(t) or t.shape[1:] != entry_shape or t.shape[0] != k.shape[0]
                    or t.stride(1) != entry_shape[1]):
                return False
        self.check_slots(slot_blocks, slot_offsets, k.shape[0], cache)
        self._writes[cache.dtype](cache.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(),
                                  v.stride(0), k.shape[0], entry_shape.numel(), slot_blocks.data_ptr(),
                                  slot_offsets.data_ptr(), cache.shape[1], cache.shape[2], layer)
        return True

    def check_slots(self, blocks: torch.Tensor, offsets: torch.Tensor, tokens: int,
                     cache: torch.Tensor) -> None:
        """Every layer of a step passes the same two tensors: checked once per step (the
        references held here keep them alive, so identity cannot match new tensors)."""
        last = self._last_slots
        if last is not None and last[0] is blocks and last[1] is offsets and last[2] == cache.shape:
            return
        if (blocks.dtype != torch.int64 or offsets.dtype != torch.int64 or not blocks.is_contiguous()
                or not offsets.is_contiguous() or blocks.shape != (tokens,)
                or offsets.shape != (tokens,)):
            raise ValueError("slot_blocks and slot_offsets must be contiguous int64, one per token")
        if tokens and (int(blocks.min()) < 0 or int(blocks.max()) >= cache.shape[0]
                       or int(offsets.min()) < 0 or int(offsets.max()) >= cache.shape[2]):
            raise ValueError("a KV slot points outside the cache")
        self._last_slots = (blocks, offsets, cache.shape)


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


def library_from_source(name: str, source: Path) -> ctypes.CDLL:
    """`source`, another version of csrc/<name>.c (a benchmark's baseline), compiled as the engine's
    kernels are and loaded; raises where it cannot be."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler found")
    return ctypes.CDLL(str(_build(compiler, name, source)))


def _wrap(cls, name: str):
    lib = kernel_library(name)
    if lib is None:
        return None
    try:
        return cls(lib)
    except AttributeError as exc:   # a library without this kernel's symbols
        log.warning("CPU kernel %s unavailable, using the torch path: %s",
                    getattr(cls, "__name__", name), exc)
        return None


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    return _wrap(PagedDecodeKernel, "paged_decode_attention")


@functools.cache
def block_linear_kernel() -> BlockLinearKernel | None:
    return _wrap(BlockLinearKernel, "block_linear")


@functools.cache
def integer_block_linear_kernel(bits: int) -> IntegerBlockLinearKernel | None:
    """The kernel for `bits`-bit activations (16 or 8)."""
    return _wrap(functools.partial(IntegerBlockLinearKernel, bits=bits), "integer_block_linear")


@functools.cache
def fused_ops_kernel() -> FusedOpsKernel | None:
    return _wrap(FusedOpsKernel, "fused_ops")


def reset() -> None:
    """Forget the loaded kernels (tests switch them off and on)."""
    for cached in (kernel_library, paged_decode_kernel, block_linear_kernel,
                   integer_block_linear_kernel, fused_ops_kernel):
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
