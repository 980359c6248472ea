"""The Mooncake implementation of the KV store backend: blocks move by key between the engine's paged
KV cache and the store, in `embedded` mode (a client and segment in this process) or `node` mode."""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..supervised_process import tcp_open
from . import same_host
from .backend import (
    BlockMissing,
    KVStoreError,
    KVTransferBackend,
    StoreConfig,
    StoreFull,
    StoreUnavailable,
    same_length,
)
from .master import metadata_answers

if TYPE_CHECKING:   # imported where memory is allocated: worker actors use the store without torch
    import torch

log = logging.getLogger(__name__)

# How the modes move bytes:
# Blocks move by key between registered memory (the engine's paged KV cache) and the store, zero-copy.
# Two client modes: `embedded` runs a Mooncake client (and its segment) inside this process; `node`
# attaches over shared memory to the node's one store client process (node_client.py),
# which owns the segment and does the copies itself, reading and writing this process's cache directly.
# Embedded clients on `tcp` keep their segment in shared memory: a put is copied straight into it, and
# a get whose replica sits in a same-host client's segment is copied straight out of it
# (same_host.py) instead of crossing TCP.

# Mooncake ErrorCode values (mooncake-store types.h); Python calls return them as plain ints.
BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200  # no segment has room for the object (store full)
INVALID_PARAMS = -600  # e.g. the destination buffer is smaller than the object
REPLICA_IS_NOT_READY = -703  # a put of this key is still in flight
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706  # remove() refused: the object was read or written within the lease TTL
LEASE_EXPIRED = -707  # the lease ran out (object may be evicted) before the transfer finished
TRANSFER_FAIL = -800  # the segment holding the object is unreachable (e.g. its client died)
RPC_FAIL = -900  # the master is unreachable
RPC_TIMEOUT = -901
_UNAVAILABLE = {RPC_FAIL, RPC_TIMEOUT}
# On get these all mean "the block is not (or no longer) readable": the caller recomputes it.
_MISSING = {OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY, LEASE_EXPIRED, TRANSFER_FAIL}
_NAMES = {BUFFER_OVERFLOW: "BUFFER_OVERFLOW", NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE",
          INVALID_PARAMS: "INVALID_PARAMS", REPLICA_IS_NOT_READY: "REPLICA_IS_NOT_READY",
          OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND", OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS",
          OBJECT_HAS_LEASE: "OBJECT_HAS_LEASE", LEASE_EXPIRED: "LEASE_EXPIRED",
          TRANSFER_FAIL: "TRANSFER_FAIL", RPC_FAIL: "RPC_FAIL", RPC_TIMEOUT: "RPC_TIMEOUT"}

# health_check() answers
_HEALTHY, _CLOSED, _MASTER_UNREACHABLE = 0, 1, 2

# mooncake 0.3.13's dummy client keeps its shared mappings in process-wide state: two attached at
# once in one process can crash the node client. Held by the one open node-mode backend.
_NODE_ATTACHMENT = threading.Lock()


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def code_name(code: int) -> str:
    return f"{_NAMES.get(code, 'ERROR')}({code})"


def _runs_of_bytes(indices: list[int], sizes: Sequence[int], limit: int) -> Iterator[list[int]]:
    """`indices` in order, cut into runs of at most `limit` bytes (a larger item is a run alone)."""
    run: list[int] = []
    total = 0
    for i in indices:
        if run and total + sizes[i] > limit:
            yield run
            run, total = [], 0
        run.append(i)
        total += sizes[i]
    if run:
        yield run


def _memory_buffers(replicas: Sequence[Any], size: int) -> Iterator[Any]:
    """The buffer descriptors of an object's complete in-memory replicas of `size` bytes (one of
    another size means the stored layout differs: none is yielded, and the transport reports it)."""
    from mooncake.store import ReplicaStatus

    for replica in replicas:
        if replica.is_memory_replica() and replica.status == ReplicaStatus.COMPLETE:
            where = replica.get_memory_descriptor().buffer_descriptor
            if where.size == size:
                yield where


def _discard(store: Any, keys: list[str]) -> None:
    """Force-remove objects a put completed but never wrote; a failure is logged (such an object
    fails every reader's checksum until it is evicted). Called from a finally: raises nothing."""
    try:
        failed = [k for k, c in zip(keys, store.batch_remove(keys, True)) if c not in (0, OBJECT_NOT_FOUND)]
    except Exception as exc:  # noqa: BLE001 - must not mask the error being handled
        log.error("removing %d unwritten store objects failed: %s", len(keys), exc)
        return
    if failed:
        log.error("%d unwritten store objects could not be removed, e.g. %s", len(failed), failed[0])


# -- Mooncake ------------------------------------------------------------------------------------

class MooncakeBackend(KVTransferBackend):
    """`mooncake.store.MooncakeDistributedStore` behind KVTransferBackend.

    Protocols: `tcp` is what runs here and in CI; `rdma` needs `device_name`; `ascend` (NPU HBM on
    910B) is passed through to Mooncake's Ascend transport and is untested on hardware.

    Threads: Mooncake releases the GIL during batch calls and one client takes concurrent batch calls
    from several threads (tried here with 8; it is no faster on TCP), so data calls are not
    serialized. The registration table and close() take a lock; do not close() or unregister memory
    while transfers into it are in flight.

    Master failure: calls check the client's cached health first (Mooncake pings the master about
    once a second), so once the loss is noticed every call raises StoreUnavailable at once; a put
    issued in the first second may spend ~4 s in Mooncake's RPC retry before raising. If the master
    comes back on the same address the client remounts by itself and calls work again (the store's
    contents are lost). Caveat: close() while the master is down blocks for 5-20 s inside Mooncake
    (it retries unmounting with the GIL held); restart the master first when you can.

    Same-host reads (embedded + tcp, `StoreConfig.same_host_reads`, on by default): the segment is a
    memfd mounted with `mount_segment` and advertised on the metadata server; a get first asks the
    master where each replica is, copies those in a same-host segment directly (same_host.py), and sends
    the rest through the transport. Counted in `blocks_read_same_host` / `blocks_read_transport`.
    Puts then go straight into the own segment too (`_put_direct`), counted in
    `blocks_written_direct` / `blocks_written_transport`.

    Node mode (`StoreConfig.client == "node"`, Mooncake's "dummy" client): this process holds no
    segment and moves no bytes; the node client maps the memory `allocate` hands out (memfd shared
    memory, not /dev/shm) and copies between it and the store. Blocks written this way live in the
    node client's segment, so they outlive this process. The node client unmaps a dead process's
    memory about 10 s after it stops pinging. A lost master reads as in embedded mode (StoreUnavailable,
    calls work again ~2 s after it is back on the same address). If the node client dies, calls raise
    StoreUnavailable (the first one may take ~9 s to notice) and, in mooncake 0.3.13.post1, keep
    failing even after it is restarted: re-registering the memory fails there ("Transfer Engine does
    not support overlapped memory region"), so such a worker recomputes prompts until it restarts.
    """

    # Mooncake retries a failed setup 20 times at ~4.5 s each (90 s) by default; the preflight probe
    # makes failure unlikely, and a couple of retries bound it when it happens anyway.
    _SETUP_RETRIES = "2"

    def __init__(self, config: StoreConfig) -> None:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self.config = config
        self._lock = threading.Lock()
        self._regions: dict[int, int] = {}  # registered ptr -> nbytes
        self._preflight()
        store = MooncakeDistributedStore()
        node = config.client == "node"
        if node:
            self._attach(store)
        else:
            os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", self._SETUP_RETRIES)
            shm = self._reads_same_host
            # With same-host reads the segment is mounted after setup, from shared memory.
            rc = store.setup(config.local_hostname, config.metadata_server,
                             0 if shm else config.global_segment_size, config.local_buffer_size,
                             config.protocol, config.device_name, config.master_server_addr)
            if rc != 0:
                # Never call into a store whose setup failed: Mooncake dereferences its missing client.
                raise StoreUnavailable(f"Mooncake client setup failed ({code_name(rc)}) against "
                                       f"{self._peer}")
        self._store: MooncakeDistributedStore | None = store
        # "ip:port" of the segment this client's puts go to: its own, or (node mode) the node client's
        self.segment_name = config.node_segment if node else store.get_hostname()
        self._segment: same_host.SharedSegment | None = None
        self._advert: same_host.AdvertKeeper | None = None  # keeps this segment advertised
        self._peers: same_host.PeerSegments | None = None
        self.blocks_read_same_host = 0  # gets copied out of a same-host segment
        self.blocks_read_transport = 0  # gets through Mooncake's transport
        self._own_span: tuple[int, int] | None = None  # (base, size) of this client's shared segment
        self.blocks_written_direct = 0  # puts copied straight into this client's segment
        self.blocks_written_transport = 0  # puts through Mooncake's transfer (batch_put_from/upsert)
        if not node and self._reads_same_host:
            try:
                self._mount_shared_segment(store)
            except BaseException:
                if self._advert is not None:
                    self._advert.stop()
                store.close()
                raise
            same_host.stream_copier()  # built (or loaded) now, not inside the first large handoff
        self._put_config = ReplicateConfig()
        if config.prefer_local_segment and self.segment_name and (node or config.global_segment_size > 0):
            self._put_config.preferred_segment = self.segment_name
        if node:
            log.info("attached to the node store client %s (segment %s)", config.node_client_address,
                     self.segment_name or "unknown")
        else:
            log.info("Mooncake client %s up (%s, segment %d MiB) -> master %s", self.segment_name,
                     config.protocol, config.global_segment_size >> 20, config.master_server_addr)

    def _attach(self, store: Any) -> None:
        """Node mode: attach `store` (a dummy client) to the node client; holds _NODE_ATTACHMENT
        until close()."""
        if not _NODE_ATTACHMENT.acquire(blocking=False):
            raise KVStoreError("this process is already attached to a node store client: close that "
                               "backend first (one node-mode client per process)")
        try:
            # The pool size is unused by 0.3.13's dummy client: each alloc maps its own memfd.
            rc = store.setup_dummy(0, self.config.local_buffer_size, self.config.node_client_address)
            if rc != 0:
                raise StoreUnavailable(f"attaching to the {self._peer} failed ({code_name(rc)})")
            # health_check() reads "unreachable" until the dummy's first ping answers (a few ms)
            deadline = time.monotonic() + self.config.connect_timeout_s
            while store.health_check() != _HEALTHY:
                if time.monotonic() > deadline:
                    store.close()
                    raise StoreUnavailable(f"{self._peer} accepted the attach but answers no ping")
                time.sleep(0.005)
        except BaseException:
            _NODE_ATTACHMENT.release()
            raise

    @property
    def _reads_same_host(self) -> bool:
        c = self.config
        return c.client == "embedded" and c.protocol == "tcp" and c.same_host_reads

    def _mount_shared_segment(self, store: Any) -> None:
        """Embedded + same-host reads: mount the segment from shared memory and advertise it; where
        shared memory cannot be had, mount Mooncake's own (this client then only reads directly)."""
        size, own = self.config.global_segment_size, None
        if size > 0:
            try:
                segment = same_host.SharedSegment(size)
            except OSError as e:
                log.warning("no shared memory for the store segment (%s): same-host peers will read "
                            "it over TCP", e)
                segment = None
            if segment is not None:
                res = store.mount_segment(segment.path, size, 0, "tcp", "")
                if res.get("ret") == 0:
                    self._segment = segment
                    own = (self.segment_name, segment.advert())
                    segment.populate(own[1].base)
                    self._own_span = (own[1].base, size)
                else:
                    segment.close()
                    log.warning("mounting the shared-memory segment failed (%s): same-host peers will "
                                "read it over TCP", code_name(res.get("ret", -1)))
            if self._segment is None:
                res = store.allocate_and_mount_segment(size, "tcp", "")
                if res.get("ret") != 0:
                    raise StoreUnavailable(f"mounting a {size >> 20} MiB segment failed "
                                           f"({code_name(res.get('ret', -1))})")
        if own is not None:
            self._advert = same_host.AdvertKeeper(self.config.metadata_server, *own)
        self._peers = same_host.PeerSegments(self.config.metadata_server, own)

    @property
    def _peer(self) -> str:
        """What this client talks to: the master, or in node mode the node's store client."""
        if self.config.client == "node":
            return f"node store client {self.config.node_client_address}"
        return f"mooncake_master {self.config.master_server_addr}"

    def _preflight(self) -> None:
        t = self.config.connect_timeout_s
        if self.config.client == "node":  # the node client talks to the master; we only need it
            if not tcp_open(*self.config.node_client_host_port, t):
                raise StoreUnavailable(f"{self._peer} unreachable")
            return
        host, port = self.config.master_host_port
        if not tcp_open(host, port, t):
            raise StoreUnavailable(f"mooncake_master RPC {self.config.master_server_addr} unreachable")
        if not metadata_answers(self.config.metadata_server, t):
            raise StoreUnavailable(f"metadata server {self.config.metadata_server} not answering")

    def _live(self) -> Any:
        """The Mooncake client, after checking it is open and its master reachable."""
        store = self._store
        if store is None:
            raise KVStoreError("store client is closed")
        rc = store.health_check()
        if rc == _MASTER_UNREACHABLE:  # in node mode: the node client, or the master behind it
            raise StoreUnavailable(f"{self._peer} unreachable"
                                   + (" (or its master)" if self.config.client == "node" else ""))
        if rc != _HEALTHY:
            raise KVStoreError(f"store client not usable (health_check={rc})")
        return store

    # -- memory --
    def allocate(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of zero-filled host memory that this client moves zero-copy, as a 1-D uint8 tensor
        (an engine's `kv_allocator`). Node mode: a shared mapping the node client maps too, registered
        at once; it stays mapped until this process exits (mooncake 0.3.13 has no way to free it).
        Embedded mode: ordinary memory, registered by register_cache."""
        import torch
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if self.config.client == "embedded":
            return torch.zeros(nbytes, dtype=torch.uint8)
        available = _mem_available()
        if available is not None and nbytes > available:
            # Mooncake populates the whole mapping up front; past free memory it stalls, not fails.
            raise KVStoreError(f"cannot map {nbytes} bytes of shared memory: {available} available")
        with self._lock:
            store = self._live()
            ptr = store.alloc_from_mem_pool(nbytes)
            if ptr <= 0:
                raise KVStoreError(f"shared memory allocation of {nbytes} bytes failed ({ptr})")
            rc = store.register_buffer(ptr, nbytes)
            if rc != 0:
                raise KVStoreError(f"register_buffer of the new mapping failed: {code_name(rc)}")
            self._regions[ptr] = nbytes
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)

    def register_buffer(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if ptr in self._regions:
                if self._regions[ptr] != nbytes:
                    raise ValueError(f"buffer at {ptr:#x} already registered with {self._regions[ptr]} bytes")
                return
            rc = self._live().register_buffer(ptr, nbytes)
            if rc != 0:
                hint = " (node mode registers only whole mappings from allocate())" \
                    if self.config.client == "node" else ""
                raise KVStoreError(f"register_buffer({ptr:#x}, {nbytes}) failed: {code_name(rc)}{hint}")
            self._regions[ptr] = nbytes

    def unregister_buffer(self, ptr: int) -> None:
        with self._lock:
            if self._regions.pop(ptr, None) is None:
                return
            rc = self._live().unregister_buffer(ptr)
            if rc != 0:
                raise KVStoreError(f"unregister_buffer({ptr:#x}) failed: {code_name(rc)}")

    def register_cache(self, cache: torch.Tensor) -> None:
        if self.config.protocol == "tcp" and cache.device.type != "cpu":
            raise ValueError(f"protocol tcp moves host memory only; the cache is on {cache.device}")
        super().register_cache(cache)

    def _check_spans(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> None:
        if not len(keys) == len(ptrs) == len(sizes):
            raise ValueError(f"{len(keys)} keys, {len(ptrs)} addresses, {len(sizes)} sizes")
        regions = list(self._regions.items())
        for ptr, size in zip(ptrs, sizes):
            if size <= 0:
                raise ValueError(f"block size must be positive, got {size}")
            # rdma/ascend need registered memory; checking on tcp too catches the bug early.
            if not any(base <= ptr and ptr + size <= base + n for base, n in regions):
                raise ValueError(f"[{ptr:#x}, +{size}) is not inside a registered buffer")

    # -- data --
    def put_blocks(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> list[bool]:
        self._check_spans(keys, ptrs, sizes)
        if not keys:
            return []
        store = self._live()
        if self._own_span is not None and self._put_config.preferred_segment:
            codes = self._put_direct(store, list(keys), list(ptrs), list(sizes))
        else:
            codes = store.batch_put_from(list(keys), list(ptrs), list(sizes), self._put_config)
            self.blocks_written_transport += len(keys)
        # An existing key names the same content (keys are content hashes): not an error. Its bytes
        # may differ in the last bits (or, mid-put by another writer, not be there yet); readers
        # check them against a checksum either way.
        failed = [(k, c) for k, c in zip(keys, codes) if c != 0 and c != OBJECT_ALREADY_EXISTS]
        if not failed:
            return [c == 0 for c in codes]
        first = ", ".join(f"{k}: {code_name(c)}" for k, c in failed[:4])
        msg = f"put failed for {len(failed)}/{len(keys)} block(s): {first}"
        if any(c in _UNAVAILABLE for _, c in failed):
            raise StoreUnavailable(msg)
        if any(c in (NO_AVAILABLE_HANDLE, BUFFER_OVERFLOW) for _, c in failed):
            raise StoreFull(msg)
        raise KVStoreError(msg)

    # Bytes written straight into the segment per replica lookup: each lookup's lease (the master's
    # kv_lease_ttl, seconds) must outlast the copies made under it, even at a slow 1 GB/s.
    _DIRECT_CHUNK_BYTES = 256 << 20

    def _put_direct(self, store: Any, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        """Put by copying the bytes straight into this client's own segment (same_host.copy_spans: up to
        four threads and streaming stores for large puts) instead of through Mooncake's transfer;
        per-key codes as batch_put_from's. Needs replica_num 1 (the default): only the replica in
        this segment is written.

        Mooncake tells where an object lives only once it is complete, so the objects are reserved
        and completed first (`batch_put_session_start` / `_end`), then looked up (which takes the
        read lease that keeps them from eviction while they are written) and filled. Until the
        copy lands such an object holds stale bytes under its key; nothing reads it unchecked: a
        decode learns the keys from a manifest sent after this returns and checks every block's
        checksum, and the prefix cache finds a block only through its commit record, written after
        (kv_connector.py). An object the master placed elsewhere (this segment full) is rewritten
        through the transport (`batch_upsert_from`)."""
        codes = list(store.batch_put_session_start(keys, sizes, self._put_config))
        started = [i for i, c in enumerate(codes) if c == 0]
        if not started:
            return codes
        unwritten: set[int] = set()  # complete objects whose bytes have not landed
        try:
            ended = list(store.batch_put_session_end([keys[i] for i in started]))
            ended += [TRANSFER_FAIL] * (len(started) - len(ended))
            for i, c in zip(started, ended):
                codes[i] = c
            done = [i for i in started if codes[i] == 0]
            unwritten.update(done)
            if len(done) < len(started):
                store.batch_put_session_revoke([keys[i] for i in started if codes[i] != 0])
            elsewhere: list[int] = []
            for chunk in _runs_of_bytes(done, sizes, self._DIRECT_CHUNK_BYTES):
                descs = store.batch_get_replica_desc([keys[i] for i in chunk])
                at = {i: self._own_address(descs.get(keys[i], ()), sizes[i]) for i in chunk}
                here = [i for i in chunk if at[i] is not None]
                elsewhere += [i for i in chunk if at[i] is None]
                same_host.copy_spans([(at[i], ptrs[i], sizes[i]) for i in here])
                unwritten.difference_update(here)
                self.blocks_written_direct += len(here)
            if elsewhere:
                upserted = store.batch_upsert_from([keys[i] for i in elsewhere], [ptrs[i] for i in elsewhere],
                                                   [sizes[i] for i in elsewhere], self._put_config)
                for i, c in zip(elsewhere, upserted):
                    codes[i] = c
                    if c == 0:
                        unwritten.discard(i)
                        self.blocks_written_transport += 1
        finally:
            if unwritten:  # never leave stale bytes under a content key for a later writer to trust
                _discard(store, [keys[i] for i in unwritten])
                for i in unwritten:
                    if codes[i] == 0:
                        codes[i] = TRANSFER_FAIL
        return codes

    def _own_address(self, replicas: Sequence[Any], size: int) -> int | None:
        """Where in this client's own segment the object with these replicas lives, or None."""
        base, span = self._own_span
        for where in _memory_buffers(replicas, size):
            if (where.transport_endpoint == self.segment_name and base <= where.buffer_address
                    and where.buffer_address + size <= base + span):
                return where.buffer_address
        return None

    def get_blocks(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> None:
        self._check_spans(keys, ptrs, sizes)
        if not keys:
            return
        store = self._live()
        if self._peers is not None:
            rest = self._read_same_host(store, keys, ptrs, sizes)
            keys, ptrs, sizes = ([seq[i] for i in rest] for seq in (keys, ptrs, sizes))
            if not keys:
                return
        self.blocks_read_transport += len(keys)
        codes = store.batch_get_into(list(keys), list(ptrs), list(sizes))
        missing, reasons, wrong = [], [], []
        for key, size, code in zip(keys, sizes, codes):
            if code == size:
                continue
            if code in _UNAVAILABLE:
                raise StoreUnavailable(f"get of {len(keys)} block(s) failed: {code_name(code)}")
            if code in _MISSING:
                missing.append(key)
                reasons.append(code_name(code))
            else:
                wrong.append((key, code, size))
        if wrong:
            # A positive count is the object's real size; INVALID_PARAMS means it exceeds the buffer.
            # Either way the stored layout differs from ours: a bug, not a cache miss.
            k, c, s = wrong[0]
            raise KVStoreError(f"{len(wrong)} block(s) do not match the expected size, e.g. {k}: "
                               f"got {code_name(c) if c < 0 else f'{c} bytes'}, expected {s} bytes")
        if missing:
            raise BlockMissing(missing, reasons)

    def _read_same_host(self, store: Any, keys: Sequence[str], ptrs: Sequence[int],
                        sizes: Sequence[int]) -> list[int]:
        """Copy every block whose replica is in a same-host segment straight out of it; returns the
        indices left for the transport (remote, missing, or not the expected size: the transport
        path reports those). Looking the replicas up takes the same read lease a transport get does."""
        assert self._peers is not None
        peers = self._peers
        descs = store.batch_get_replica_desc(list(keys))
        spans, rest, held = [], [], {}
        try:
            for i, (key, ptr, size) in enumerate(zip(keys, ptrs, sizes)):
                src = None
                for where in _memory_buffers(descs.get(key, ()), size):
                    endpoint = where.transport_endpoint
                    if endpoint not in held:
                        held[endpoint] = peers.acquire(endpoint)
                    mapping = held[endpoint]
                    if mapping is not None and (src := mapping.translate(where.buffer_address, size)):
                        break
                if src:
                    spans.append((ptr, src, size))
                else:
                    rest.append(i)
            same_host.copy_spans(spans)
        finally:
            for mapping in held.values():
                if mapping is not None:
                    peers.release(mapping)
        self.blocks_read_same_host += len(spans)
        return rest

    def put_values(self, keys: Sequence[str], values: Sequence[bytes], replace: bool = True) -> None:
        same_length(keys, values)
        if not keys:
            return
        store = self._live()
        put = store.upsert_batch if replace else store.put_batch  # put_batch keeps existing keys
        rc = put(list(keys), list(values), self._put_config)
        if rc in _UNAVAILABLE:
            raise StoreUnavailable(f"put of {len(keys)} value(s) failed: {code_name(rc)}")
        if rc != 0:
            raise KVStoreError(f"put of {len(keys)} value(s) failed: {code_name(rc)}")

    def get_values(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        store = self._live()
        values = store.get_batch(list(keys))  # b"" for a key it cannot read
        if not any(values) and not self.healthy():
            raise StoreUnavailable(f"get of {len(keys)} value(s) failed: {self._peer} unreachable")
        return [v or None for v in values]

    def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        codes = self._live().batch_is_exist(list(keys))
        if any(c < 0 for c in codes):
            bad = next(c for c in codes if c < 0)
            if bad in _UNAVAILABLE or not self.healthy():  # batch_is_exist reports a lost master as -1
                raise StoreUnavailable(f"exists() failed: {code_name(bad)}")
            raise KVStoreError(f"exists() failed: {code_name(bad)}")
        return [c == 1 for c in codes]

    def remove(self, keys: Sequence[str], force: bool = False) -> list[bool]:
        if not keys:
            return []
        codes = self._live().batch_remove(list(keys), force)
        gone = []
        for key, code in zip(keys, codes):
            if code in _UNAVAILABLE:
                raise StoreUnavailable(f"remove() failed: {code_name(code)}")
            if code in (0, OBJECT_NOT_FOUND):
                gone.append(True)
            elif code == OBJECT_HAS_LEASE:
                gone.append(False)
            else:
                raise KVStoreError(f"remove({key!r}) failed: {code_name(code)}")
        return gone

    def healthy(self) -> bool:
        return self._store is not None and self._store.health_check() == _HEALTHY

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
            self._regions.clear()
        if store is None:
            return
        if self._advert is not None:
            self._advert.stop()
            same_host.withdraw(self.config.metadata_server, self.segment_name)
        if self._peers is not None:
            self._peers.forget()
        if self.config.client == "embedded" and store.health_check() == _MASTER_UNREACHABLE:
            log.warning("closing Mooncake client %s while the master is unreachable: Mooncake's "
                        "teardown retries the unmount and may block for up to ~20 s", self.segment_name)
        rc = store.close()
        if self._segment is not None:
            self._segment.close()  # the memory goes once Mooncake (and same-host readers) unmap it
        if self.config.client == "node":
            _NODE_ATTACHMENT.release()
        if rc != 0:
            log.warning("Mooncake client %s close returned %s", self.segment_name, code_name(rc))
