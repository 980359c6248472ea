"""Same-host reads from the Mooncake store: a client's segment in shared memory, copied out directly."""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ...engine.kv_connector import on_transfer_thread
from .master import METADATA_OPENER

# Over Mooncake's TCP transport every byte of a get crosses the loopback stack, several times slower
# than a memcpy. When the replica sits in the segment of a client on the same host, the reader can copy
# it straight out of that client's memory instead:
#
# - the owner creates its segment as a memfd, mounts it in Mooncake (`mount_segment` on
#   /proc/self/fd/N) and advertises it on the master's metadata server under its transfer endpoint
#   (`SegmentAdvert`: boot id, pid, fd, device + inode, mapped base address, size);
# - a reader looks up a replica's endpoint, and where the advert's boot id is its own, opens the memfd
#   through /proc/<pid>/fd/<fd>, checks it is the same file (device + inode: a pid in another pid
#   namespace, or a recycled one, names some other file) and maps it read-only.
#
# Mooncake still places the objects and guards them: the reader learns each replica's address from the
# master, which takes a read lease (the object is not evicted while it is copied). Anything that does
# not map (another host, a peer that died, a size that does not match) goes through the transport.
# The owner writes its own puts into the segment the same way (mooncake_client.MooncakeBackend._put_direct).
# Large copies use streaming stores on up to four threads (`copy_spans`, engine/csrc/stream_copy.c).
# Only host memory over `tcp` is covered; rdma/ascend keep Mooncake's own transports.

log = logging.getLogger(__name__)

ADVERT_PREFIX = "pdcluster/shm-segment/"
ADVERT_CHECK_S = 5.0  # an owner puts its advert back this soon after it is lost (e.g. master restart)
REMOTE_RECHECK_S = 10.0  # a reader asks again this long after an endpoint had no usable advert
_MEMFD_NAME = "pdcluster-kv-segment"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_READ, _MAP_SHARED, _MAP_POPULATE = 0x1, 0x01, 0x8000
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_MAP_FAILED = ctypes.c_void_p(-1).value


def boot_id() -> str:
    """This kernel's boot id: equal for two processes exactly when they share a host (and a boot)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass(frozen=True)
class SegmentAdvert:
    """Where a client's shared-memory segment is, for readers on the same host."""
    boot_id: str
    pid: int
    fd: int
    dev: int
    ino: int
    base: int  # the segment's address in the owner's process: replica addresses are relative to it
    size: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SegmentAdvert:
        return cls(**json.loads(raw))


class SharedSegment:
    """The owner's side: `size` bytes of shared memory (a memfd, reserved up front so that running out
    of memory fails here, not as SIGBUS on a later write) for Mooncake to mount as this client's
    segment. Mooncake maps it itself; `advert()` reads where from /proc/self/maps."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        self.size = size
        self.fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError:
            os.close(self.fd)
            raise
        st = os.fstat(self.fd)
        self._dev, self._ino = st.st_dev, st.st_ino

    @property
    def path(self) -> str:
        """What to hand to `mount_segment`."""
        return f"/proc/self/fd/{self.fd}"

    def advert(self) -> SegmentAdvert:
        """Call after Mooncake has mounted (mapped) the segment."""
        return SegmentAdvert(boot_id(), os.getpid(), self.fd, self._dev, self._ino,
                             self._mapped_base(), self.size)

    def populate(self, base: int) -> None:
        """Fault Mooncake's mapping of the segment in now. Shared memory gets no transparent huge
        pages by default, so otherwise the first put into each 4 KiB page takes a page fault: puts into
        fresh parts of the segment ran at ~0.3 GB/s instead of ~4. Best effort (older kernels lack it)."""
        if _libc.madvise(base, self.size, _MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE failed: errno %d", ctypes.get_errno())

    def _mapped_base(self) -> int:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                # "start-end perms offset dev inode path": our memfd, mapped from offset 0
                if len(fields) >= 6 and int(fields[4]) == self._ino and int(fields[2], 16) == 0 \
                        and fields[5].startswith(f"/memfd:{_MEMFD_NAME}"):
                    return int(fields[0].split("-")[0], 16)
        raise RuntimeError("the shared segment is not mapped in this process (mount it first)")

    def close(self) -> None:
        """The memory lives on while anything still maps it (Mooncake until it unmounts, readers
        until they drop it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the metadata server: adverts by transfer endpoint ---------------------------------------------

def publish(metadata_url: str, endpoint: str, advert: SegmentAdvert, timeout_s: float = 2.0) -> None:
    req = urllib.request.Request(f"{metadata_url}?key={ADVERT_PREFIX}{endpoint}", data=advert.to_json(),
                                 method="PUT")
    with METADATA_OPENER.open(req, timeout=timeout_s):
        pass


def withdraw(metadata_url: str, endpoint: str, timeout_s: float = 2.0) -> None:
    req = urllib.request.Request(f"{metadata_url}?key={ADVERT_PREFIX}{endpoint}", method="DELETE")
    try:
        with METADATA_OPENER.open(req, timeout=timeout_s):
            pass
    except OSError as e:  # HTTP errors included; best effort: readers verify every advert anyway
        log.debug("withdrawing the segment advert of %s failed: %s", endpoint, e)


class AdvertKeeper:
    """Keeps an owner's advert on the metadata server: published now, and put back whenever a check
    (every ADVERT_CHECK_S) finds it gone or different: the master's built-in metadata server forgets
    everything when it restarts, and a first publish can fail. A daemon thread; `stop()` ends it."""

    def __init__(self, metadata_url: str, endpoint: str, advert: SegmentAdvert,
                 interval_s: float | None = None) -> None:
        self._args = (metadata_url, endpoint, advert)
        self._interval = ADVERT_CHECK_S if interval_s is None else interval_s
        self._stop = threading.Event()
        self.published = 0  # how many times the advert was (re)published
        self._failing = False
        self._ensure()
        self._thread = threading.Thread(target=self._run, name="kv-advert", daemon=True)
        self._thread.start()

    def _ensure(self) -> None:
        url, endpoint, advert = self._args
        if lookup(url, endpoint) == advert:
            return
        try:
            publish(url, endpoint, advert)
        except OSError as e:  # warned once per outage, not every interval while the master is down
            (log.debug if self._failing else log.warning)(
                "advertising the segment of %s failed (%s): same-host peers read it over TCP until a "
                "later try succeeds", endpoint, e)
            self._failing = True
            return
        self._failing = False
        self.published += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._ensure()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def lookup(metadata_url: str, endpoint: str, timeout_s: float = 2.0) -> SegmentAdvert | None:
    """The advert of `endpoint`'s segment, or None where it has none (or the server cannot say)."""
    try:
        with METADATA_OPENER.open(f"{metadata_url}?key={ADVERT_PREFIX}{endpoint}", timeout=timeout_s) as r:
            return SegmentAdvert.from_json(r.read())
    except (OSError, ValueError, TypeError):  # unreachable, 404, or not an advert
        return None


# -- the reader's side ------------------------------------------------------------------------------

@dataclass
class _Mapping:
    advert: SegmentAdvert
    addr: int  # where the segment is mapped in this process
    users: int = 0  # copies in flight from it: it is unmapped only when none are
    stale: bool = False  # its owner is gone: no new users; unmapped by the last one

    def translate(self, owner_addr: int, size: int) -> int | None:
        """This process's address of [owner_addr, +size) in the owner's segment, if inside it."""
        offset = owner_addr - self.advert.base
        if offset < 0 or offset + size > self.advert.size:
            return None
        return self.addr + offset


def _same_file(advert: SegmentAdvert) -> bool:
    """The owner is alive and still holds the advertised memfd under that fd."""
    try:
        st = os.stat(f"/proc/{advert.pid}/fd/{advert.fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (advert.dev, advert.ino)


class PeerSegments:
    """Maps same-host peers' segments on first use and translates replica addresses into them.

    `acquire(endpoint)` checks the owner on every use: a peer that died (or closed its client) is
    dropped, so its replicas go to the transport like any other unreadable segment. Each acquired
    mapping must be `release`d after copying from it; a dropped mapping is unmapped only once no copy
    uses it. Endpoints without a usable advert are taken as remote for REMOTE_RECHECK_S, then asked
    about again (an advert can come late: a master restart, a failed publish); a restarted peer on
    the same endpoint gets a new advert and is picked up when its old mapping fails the check.
    """

    def __init__(self, metadata_url: str, own: tuple[str, SegmentAdvert] | None = None) -> None:
        self._url = metadata_url
        self._boot_id = boot_id()
        self._lock = threading.Lock()
        self._maps: dict[str, _Mapping] = {}
        self._remote: dict[str, float] = {}  # endpoint -> when it was found to have no usable advert
        self._own = own

    def acquire(self, endpoint: str) -> _Mapping | None:
        with self._lock:
            m = self._maps.get(endpoint)
            if m is not None and not _same_file(m.advert):
                self._drop(endpoint)
                m = None
            if m is None:
                now = time.monotonic()
                seen = self._remote.get(endpoint)
                if seen is not None and now - seen < REMOTE_RECHECK_S:
                    return None
                m = self._map(endpoint)
                if m is None:
                    self._remote[endpoint] = now
                    return None
                self._remote.pop(endpoint, None)
                self._maps[endpoint] = m
            m.users += 1
            return m

    def release(self, m: _Mapping) -> None:
        with self._lock:
            m.users -= 1
            if m.stale and m.users == 0:
                _libc.munmap(m.addr, m.advert.size)

    def _map(self, endpoint: str) -> _Mapping | None:
        advert = self._own[1] if self._own and self._own[0] == endpoint else lookup(self._url, endpoint)
        if advert is None or advert.boot_id != self._boot_id:
            return None
        try:
            fd = os.open(f"/proc/{advert.pid}/fd/{advert.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # gone, or not ours to open (another user, a hardened /proc)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (advert.dev, advert.ino) or st.st_size < advert.size:
                return None
            # populated up front, for the same reason as SharedSegment.populate
            addr = _libc.mmap(None, advert.size, _PROT_READ, _MAP_SHARED | _MAP_POPULATE, fd, 0)
            if addr in (None, _MAP_FAILED):
                log.warning("mapping the segment of %s failed: errno %d", endpoint, ctypes.get_errno())
                return None
        finally:
            os.close(fd)
        log.info("reading %s's segment (%d MiB) through shared memory", endpoint, advert.size >> 20)
        return _Mapping(advert, addr)

    def _drop(self, endpoint: str) -> None:
        m = self._maps.pop(endpoint)
        m.stale = True
        if m.users == 0:
            _libc.munmap(m.addr, m.advert.size)

    def forget(self) -> None:
        """Drop every mapping (each unmapped once no copy uses it) and every 'remote' verdict."""
        with self._lock:
            for endpoint in list(self._maps):
                self._drop(endpoint)
            self._remote.clear()


# -- copying ----------------------------------------------------------------------------------------

_PARALLEL_MIN_BYTES = 8 << 20  # below this one thread copies: a hand-off to the pool costs more
_STREAM_MIN_BYTES = 8 << 20  # from here on streaming stores: the copy is far larger than a core's caches
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _copy_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


@functools.cache
def stream_copier() -> Callable[[Sequence[tuple[int, int, int]]], None] | None:
    """engine/csrc/stream_copy.c's copy_spans_nt (streaming stores, one ctypes call per group of
    spans), or None where no kernel can be built (PDCLUSTER_CPU_KERNELS=0, no compiler)."""
    from ...engine.cpu_kernels import kernel_library

    lib = kernel_library("stream_copy")
    if lib is None:
        return None
    fn = lib.copy_spans_nt
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None

    def copy(spans: Sequence[tuple[int, int, int]]) -> None:
        if spans:
            cols = [(ctypes.c_uint64 * len(spans))(*col) for col in zip(*spans)]
            fn(*cols, len(spans))  # ctypes releases the GIL for the call
    return copy


def _memmove_all(spans: Sequence[tuple[int, int, int]]) -> None:
    for dst, src, n in spans:
        ctypes.memmove(dst, src, n)  # ctypes releases the GIL for the call


def copy_spans(spans: Sequence[tuple[int, int, int]]) -> None:
    """Copy each (dst, src, nbytes) (spans must not overlap): memmove for small totals; from 8 MiB
    streaming stores (where the kernel builds) split over up to four threads, or on the caller's
    thread alone on a KV transfer thread (the step owns the other cores). The bytes land either
    way before it returns."""
    global _pool
    total = sum(n for _, _, n in spans)
    copy = (stream_copier() if total >= _STREAM_MIN_BYTES else None) or _memmove_all
    threads = 1 if on_transfer_thread() else _copy_threads()
    if threads == 1 or len(spans) < 2 or total < _PARALLEL_MIN_BYTES:
        copy(spans)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kv-copy")
    groups: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for span in sorted(spans, key=lambda s: -s[2]):  # largest first onto the least-loaded thread
        i = loads.index(min(loads))
        groups[i].append(span)
        loads[i] += span[2]
    for f in [_pool.submit(copy, g) for g in groups if g]:
        f.result()
