"""Mooncake store layer against a real mooncake_master: cross-process zero-copy handoff, missing keys,
master loss and restart, in both client modes (embedded, and attached to a node client over shared
memory). Every process started here is stopped and reaped before the module ends.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pdcluster.cluster.kvstore import same_host
from pdcluster.cluster.kvstore.backend import BlockMissing, KVStoreError, StoreConfig, StoreUnavailable, block_nbytes
from pdcluster.cluster.kvstore.mooncake_client import MooncakeBackend
from pdcluster.cluster.kvstore.master import MasterConfig, MasterStartError, MooncakeMaster
from pdcluster.cluster.kvstore.node_client import MooncakeNodeClient, NodeClientConfig
from pdcluster.cluster.supervised_process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# A small block-major MHA cache: [num_blocks, num_layers, block_size, 2, num_kv_heads, head_dim].
SHAPE = (8, 4, 16, 2, 2, 32)


def _config(master: MooncakeMaster, segment_mib: int = 64) -> StoreConfig:
    return StoreConfig(master_server_addr=master.rpc_address, metadata_server=master.metadata_url,
                       global_segment_size=segment_mib << 20, local_buffer_size=16 << 20)


def _keys(tag: str, n: int) -> list[str]:
    return [f"{tag}-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(n)]


def _random_cache(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _cache_from(backend: MooncakeBackend, seed: int | None = None) -> torch.Tensor:
    """A cache in memory `backend` can move (node mode: shared with the node client), zeroed or random."""
    cache = backend.allocate(torch.Size(SHAPE).numel() * 4).view(torch.float32).view(SHAPE)
    if seed is not None:
        cache.copy_(_random_cache(seed))
    return cache


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("mooncake") / "master.log"
    m = MooncakeMaster(MasterConfig(log_path=str(log))).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def backend(master: MooncakeMaster):
    b = MooncakeBackend(_config(master))  # one client for the module: close() takes 1-2 s in Mooncake
    yield b
    b.close()


@pytest.fixture
def register(backend: MooncakeBackend):
    """Register tensors with the module's client for one test (freed memory must not stay registered)."""
    tensors: list[torch.Tensor] = []

    def _register(t: torch.Tensor) -> torch.Tensor:
        backend.register_cache(t)
        tensors.append(t)
        return t

    yield _register
    for t in tensors:
        backend.unregister_cache(t)


def test_store_config_rejects_what_mooncake_would_misreport() -> None:
    ok = dict(master_server_addr="127.0.0.1:50051", metadata_server="http://127.0.0.1:18080/metadata")
    StoreConfig(**ok, protocol="rdma", device_name="mlx5_0")
    for bad in (dict(protocol="rdma"), dict(protocol="ib"), dict(master_server_addr="127.0.0.1"),
                dict(metadata_server="etcd://127.0.0.1:2379"), dict(global_segment_size=-1)):
        with pytest.raises(ValueError):
            StoreConfig(**(ok | bad))


def _listen_addrs(port: int) -> set[str]:
    """IPv4 addresses with a LISTEN socket on `port` (from /proc/net/tcp)."""
    addrs = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            addrs.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return addrs


def test_master_listens_on_loopback_and_is_healthy(master: MooncakeMaster) -> None:
    assert master.health().ok
    cfg = master.config
    ports = {cfg.rpc_port, cfg.metadata_port, cfg.metrics_port}
    assert len(ports) == 3 and 0 not in ports
    # The metadata server is left out: this mooncake_master build binds it to 0.0.0.0 whatever
    # --http_metadata_server_host says.
    assert _listen_addrs(cfg.rpc_port) == {"127.0.0.1"}
    assert _listen_addrs(cfg.metrics_port) == {"127.0.0.1"}


def test_picked_ports_are_never_ones_the_kernel_hands_out_by_itself() -> None:
    """A picked port lies below the ephemeral range (whence bind(0) and outgoing connections take
    theirs, so no other process gets it by chance before the master binds it), is bindable, and is
    never picked twice."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low < 21000:
        pytest.skip(f"this kernel's ephemeral range starts at {low}")
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= p < low for p in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_master_refuses_a_port_another_process_holds(tmp_path: Path) -> None:
    """mooncake_master keeps running when its RPC port is taken and serves nothing there; the health
    probe would then answer for the other process. Start must fail instead, and new picked ports win."""
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        with pytest.raises(MasterStartError, match=f"rpc_port {taken}: another process holds it"):
            MooncakeMaster(MasterConfig(rpc_port=taken, log_path=str(tmp_path / "m.log"))).start()
        picks = iter([taken])
        ports = dict(MooncakeMaster._PORTS, rpc_port=lambda host: next(picks, None) or free_port(host))
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(MooncakeMaster, "_PORTS", ports)
            with MooncakeMaster(MasterConfig(log_path=str(tmp_path / "m2.log"))) as m:
                assert m.config.rpc_port != taken and m.health().ok
                assert _listen_addrs(m.config.rpc_port) == {"127.0.0.1"}
    finally:
        squatter.close()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_master_dies_with_a_crashed_supervisor() -> None:
    # Started from a thread that exits at once (like asyncio.to_thread), then the process is SIGKILLed.
    code = ("import os, threading\n"
            "from pdcluster.cluster.kvstore.master import MooncakeMaster\n"
            "box = []\n"
            "t = threading.Thread(target=lambda: box.append(MooncakeMaster().start()))\n"
            "t.start(); t.join()\n"
            "print(box[0].pid, flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # do not leak it even when the test fails
            pytest.fail("mooncake_master outlived its supervisor")
        time.sleep(0.05)


def _peer(config: StoreConfig, in_keys: list[str], out_keys: list[str], conn) -> None:
    """Second process with its own client and segment: loads `in_keys` into blocks 2.. of a zeroed
    cache and sends it back, stores blocks of its own under `out_keys`, then dies without closing
    when told to, like a crashed worker."""
    try:
        backend = MooncakeBackend(config)
        cache = _cache_from(backend)
        backend.register_cache(cache)
        backend.get_cache_blocks(cache, list(range(2, 2 + len(in_keys))), in_keys)
        conn.send(("loaded", cache.clone()))
        own = _cache_from(backend, seed=2)
        backend.register_cache(own)
        backend.put_cache_blocks(own, list(range(len(out_keys))), out_keys)
        conn.send(("stored", own[: len(out_keys)].clone()))
    except Exception as e:  # report to the parent instead of leaving it waiting
        conn.send(("error", repr(e)))
    conn.recv()
    os._exit(0)


def _recv(conn, what: str):
    assert conn.poll(60), f"peer process sent nothing ({what})"
    kind, payload = conn.recv()
    assert kind == what, payload
    return payload


def test_handoff_between_processes_is_byte_exact(master: MooncakeMaster, backend: MooncakeBackend,
                                                  register) -> None:
    cache = _random_cache(seed=1)
    cache[3, 0, 0, 0, 0, 0] = float("nan")  # bit patterns must survive, not just values
    register(cache)
    sent, back = _keys("p2d", 3), _keys("d2p", 2)
    backend.put_cache_blocks(cache, [5, 3, 0], sent)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(_config(master), sent, back, child), daemon=True)
    proc.start()
    try:
        loaded = _recv(parent, "loaded")
        assert _bytes(loaded[2:5]) == _bytes(cache[[5, 3, 0]])
        untouched = [0, 1, 5, 6, 7]  # zero-copy wrote exactly the requested blocks
        assert not loaded[untouched].any()

        theirs = _recv(parent, "stored")
        mine = torch.full(SHAPE, 7.0)
        register(mine)
        backend.get_cache_blocks(mine, [6, 1], back)  # pulled from the other process's segment
        assert _bytes(mine[[6, 1]]) == _bytes(theirs)

        parent.send("die")
        proc.join(timeout=30)
        assert proc.exitcode == 0
        # The segment holding `back` is gone with its process: reported missing, never garbage.
        mine.fill_(7.0)
        with pytest.raises(BlockMissing) as err:
            backend.get_cache_blocks(mine, [6, 1], back)
        assert set(err.value.missing) == set(back)
        assert bool((mine == 7.0).all())
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)


def _reader(config: StoreConfig, keys: list[str], conn) -> None:
    """Another process with its own client: loads `keys` into blocks 0.. of a zeroed cache and sends
    back what arrived and how (blocks copied from a same-host segment, blocks through the transport)."""
    try:
        backend = MooncakeBackend(config)
        cache = _cache_from(backend)
        backend.register_cache(cache)
        backend.get_cache_blocks(cache, list(range(len(keys))), keys)
        # bytes, not a tensor: torch would pass its storage as an fd, which this process (exiting
        # right after) may no longer hold when the parent asks for it
        conn.send(("loaded", (_bytes(cache[: len(keys)]), backend.blocks_read_same_host,
                              backend.blocks_read_transport)))
        backend.close()
    except Exception as e:
        conn.send(("error", repr(e)))


@pytest.mark.parametrize("same_host_reads", [True, False])
def test_same_host_reader_copies_from_the_writers_segment(master: MooncakeMaster, backend: MooncakeBackend,
                                                          register, same_host_reads: bool) -> None:
    cache = _random_cache(seed=11)
    register(cache)
    keys = _keys("direct", 4)
    written = backend.blocks_written_direct
    assert backend.put_cache_blocks(cache, [6, 1, 4, 2], keys) == [True] * 4
    assert backend.blocks_written_direct - written == 4  # copied straight into its own segment
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    config = replace(_config(master), same_host_reads=same_host_reads)
    proc = ctx.Process(target=_reader, args=(config, keys, child), daemon=True)
    proc.start()
    try:
        loaded, direct, transport = _recv(parent, "loaded")
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert loaded == _bytes(cache[[6, 1, 4, 2]])
    # on: every block straight out of this process's shared segment; off: all over TCP
    assert (direct, transport) == ((4, 0) if same_host_reads else (0, 4))
    assert backend.remove(keys) == [False] * 4  # either way the read took the master's lease


def test_a_lost_advert_is_put_back_and_readers_ask_again(master: MooncakeMaster, backend: MooncakeBackend,
                                                         register, monkeypatch) -> None:
    """The master's metadata server forgets adverts when it restarts: the owner puts its advert back,
    and a reader that found none reads through the transport meanwhile, then directly again."""
    monkeypatch.setattr(same_host, "ADVERT_CHECK_S", 0.2)
    monkeypatch.setattr(same_host, "REMOTE_RECHECK_S", 0.5)
    cache = _random_cache(seed=13)
    keys = _keys("advert", 2)
    with MooncakeBackend(_config(master)) as owner:
        owner.register_cache(cache)
        owner.put_cache_blocks(cache, [3, 4], keys)
        advert = same_host.lookup(master.metadata_url, owner.segment_name)
        assert advert is not None and advert.pid == os.getpid()
        same_host.withdraw(master.metadata_url, owner.segment_name)  # as a restarted master would have
        out = register(torch.zeros(SHAPE))
        direct, transport = backend.blocks_read_same_host, backend.blocks_read_transport
        backend.get_cache_blocks(out, [0, 1], keys)
        assert (backend.blocks_read_same_host - direct, backend.blocks_read_transport - transport) == (0, 2)
        deadline = time.monotonic() + 5
        while same_host.lookup(master.metadata_url, owner.segment_name) != advert:
            assert time.monotonic() < deadline, "the owner did not put its advert back"
            time.sleep(0.05)
        time.sleep(0.6)  # past the reader's recheck interval
        out.zero_()
        direct = backend.blocks_read_same_host
        backend.get_cache_blocks(out, [0, 1], keys)
        assert backend.blocks_read_same_host - direct == 2
        assert _bytes(out[:2]) == _bytes(cache[[3, 4]])


def test_missing_key_is_reported_not_garbage(backend: MooncakeBackend, register) -> None:
    src = _random_cache(seed=3)
    register(src)
    present, absent = _keys("present", 2), _keys("absent", 1)
    backend.put_cache_blocks(src, [0, 1], present)

    assert backend.exists(present + absent) == [True, True, False]
    dst = torch.full(SHAPE, -1.0)
    register(dst)
    with pytest.raises(BlockMissing) as err:
        backend.get_cache_blocks(dst, [4, 5, 6], [present[0], absent[0], present[1]])
    assert err.value.missing == (absent[0],)
    assert _bytes(dst[[4, 6]]) == _bytes(src[[0, 1]])
    assert bool((dst[5] == -1.0).all())


def test_wrong_block_size_is_an_error_not_a_miss(backend: MooncakeBackend, register) -> None:
    src = _random_cache(seed=4)
    register(src)
    key = _keys("size", 1)
    backend.put_cache_blocks(src, [0], key)
    other = torch.zeros(4, 4, 8, 2, 2, 32)  # half the block size
    register(other)
    assert block_nbytes(other) * 2 == block_nbytes(src)
    with pytest.raises(KVStoreError) as err:
        backend.get_cache_blocks(other, [0], key)
    assert not isinstance(err.value, BlockMissing)


def test_same_key_keeps_first_write_and_lease_blocks_remove(backend: MooncakeBackend, register) -> None:
    a, b = _random_cache(seed=5), _random_cache(seed=6)
    register(a)
    register(b)
    key = _keys("dup", 1)
    assert backend.put_cache_blocks(a, [0], key) == [True]
    # keys name content: a second write is a no-op, not an error, and says it stored nothing
    assert backend.put_cache_blocks(b, [0], key) == [False]
    out = torch.zeros(SHAPE)
    register(out)
    backend.get_cache_blocks(out, [0], key)
    assert _bytes(out[0]) == _bytes(a[0])

    assert backend.remove(key) == [False]  # just read: the lease (10 s default) pins it
    assert backend.remove(key, force=True) == [True]
    assert backend.exists(key) == [False]
    assert backend.remove(key) == [True]  # already gone counts as removed


def test_put_past_a_full_own_segment_lands_elsewhere_intact(tmp_path: Path) -> None:
    """A writer's own segment holds 1 MiB: the blocks the master places in the other client's
    segment instead cannot be copied in directly and go through the transport, byte-exact. (Own
    master: the module's has segments of peers other tests killed, which a put could land in.)"""
    blocks = torch.randint(0, 256, (48, 32 << 10), dtype=torch.uint8)  # 1.5 MiB
    keys = _keys("spill", len(blocks))
    with (MooncakeMaster(MasterConfig(log_path=str(tmp_path / "master.log"))) as master,
          MooncakeBackend(_config(master)) as other,
          MooncakeBackend(_config(master, segment_mib=1)) as small):
        small.register_cache(blocks)
        assert small.put_cache_blocks(blocks, list(range(len(blocks))), keys) == [True] * len(blocks)
        assert small.blocks_written_direct > 0 and small.blocks_written_transport > 0
        assert small.blocks_written_direct + small.blocks_written_transport == len(blocks)
        out = torch.zeros_like(blocks)
        other.register_cache(out)
        other.get_cache_blocks(out, list(range(len(blocks))), keys)
        assert torch.equal(out, blocks)


class _LookupFails:
    """The real Mooncake client, except that the replica lookup after a put's session raises."""

    def __init__(self, store) -> None:
        self._store = store

    def batch_get_replica_desc(self, keys):
        raise RuntimeError("lookup lost")

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_put_that_fails_after_completing_leaves_no_stale_object(backend: MooncakeBackend,
                                                                   register) -> None:
    """Once completed, an object holds stale bytes until the copy lands: a put that fails in between
    must remove it, or a later writer of the same key would store nothing and readers find garbage."""
    cache = register(_random_cache(seed=12))
    keys = _keys("torn", 3)
    real = backend._store
    backend._store = _LookupFails(real)
    try:
        with pytest.raises(RuntimeError, match="lookup lost"):
            backend.put_cache_blocks(cache, [0, 1, 2], keys)
    finally:
        backend._store = real
    assert backend.exists(keys) == [False] * 3
    assert backend.put_cache_blocks(cache, [0, 1, 2], keys) == [True] * 3  # stored afresh
    out = register(torch.zeros(SHAPE))
    backend.get_cache_blocks(out, [0, 1, 2], keys)
    assert _bytes(out[:3]) == _bytes(cache[:3])


def test_small_values_round_trip_and_are_replaced(backend: MooncakeBackend) -> None:
    a, b, absent = _keys("value", 3)
    backend.put_values([a, b], [b"\x01\x02\x03\x04", b"abcd"])
    backend.put_values([b], [b"efgh"])
    assert backend.get_values([a, b, absent]) == [b"\x01\x02\x03\x04", b"efgh", None]


def test_unregistered_memory_is_rejected(backend: MooncakeBackend, register) -> None:
    cache = _random_cache(seed=7)
    with pytest.raises(ValueError, match="registered"):
        backend.put_cache_blocks(cache, [0], _keys("unreg", 1))
    register(cache)
    with pytest.raises(IndexError):
        backend.put_cache_blocks(cache, [SHAPE[0]], _keys("range", 1))


@pytest.mark.slow
def test_master_loss_raises_promptly_and_restart_recovers(tmp_path: Path) -> None:
    m = MooncakeMaster(MasterConfig(log_path=str(tmp_path / "master.log"))).start()
    clients: list[MooncakeBackend] = []
    try:
        old = MooncakeBackend(_config(m, segment_mib=16))
        clients.append(old)
        cache = _random_cache(seed=8)
        old.register_cache(cache)
        keys = _keys("loss", 2)
        old.put_cache_blocks(cache, [0, 1], keys)

        os.kill(m.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            old.exists(keys)
        with pytest.raises(StoreUnavailable):  # a write may wait out Mooncake's RPC retry (~4 s)
            old.put_cache_blocks(cache, [2], _keys("loss", 1))
        assert time.monotonic() - t0 < 20
        while old.healthy():  # Mooncake pings the master about once a second
            assert time.monotonic() - t0 < 20, "client never noticed the master is gone"
            time.sleep(0.1)
        for op in (lambda: old.put_cache_blocks(cache, [3], _keys("loss", 1)),
                   lambda: old.get_cache_blocks(cache, [4], keys[:1]),
                   lambda: old.exists(keys), lambda: old.remove(keys)):
            t = time.monotonic()
            with pytest.raises(StoreUnavailable):
                op()
            assert time.monotonic() - t < 2
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):
            MooncakeBackend(_config(m))  # a new client fails fast instead of retrying for minutes
        assert time.monotonic() - t < 10

        m.restart()  # same ports; the killed process is reaped first
        new = MooncakeBackend(_config(m, segment_mib=16))
        clients.append(new)
        fresh = _random_cache(seed=9)
        new.register_cache(fresh)
        new_keys = _keys("after", 2)
        new.put_cache_blocks(fresh, [0, 1], new_keys)
        out = torch.zeros(SHAPE)
        new.register_cache(out)
        new.get_cache_blocks(out, [2, 3], new_keys)
        assert _bytes(out[[2, 3]]) == _bytes(fresh[[0, 1]])
        with pytest.raises(BlockMissing):  # the restarted master starts empty
            new.get_cache_blocks(out, [4], keys[:1])

        while not old.healthy():  # the old client remounts on its own
            assert time.monotonic() - t0 < 40, "old client did not reconnect"
            time.sleep(0.1)
        old.get_cache_blocks(cache, [5, 6], new_keys)
        assert _bytes(cache[[5, 6]]) == _bytes(fresh[[0, 1]])
    finally:
        for c in clients:
            c.close()
        m.stop()
    assert not m.running() and not m.health().ok


# -- node mode: one mooncake_client per node owns the segment; processes attach over shared memory --

@pytest.fixture(scope="module")
def node_client(master: MooncakeMaster, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("mooncake") / "node_client.log"
    node = MooncakeNodeClient(NodeClientConfig(master.rpc_address, master.metadata_url,
                                               global_segment_size=64 << 20, log_path=str(log))).start()
    yield node
    node.stop()


def _node_config(master: MooncakeMaster, node: MooncakeNodeClient) -> StoreConfig:
    return replace(_config(master), client="node", node_client_address=node.rpc_address,
                   node_segment=node.segment_name)


def test_node_client_runs_on_its_ports(node_client: MooncakeNodeClient) -> None:
    assert node_client.healthy()
    # the pinned transfer port is what names the segment that puts prefer
    assert (f"Successfully created client on port {node_client.config.transfer_port} "
            in node_client.log_path.read_text())
    with pytest.raises(ValueError, match="transfer_port"):
        NodeClientConfig("127.0.0.1:1", "http://127.0.0.1:2/metadata", transfer_port=40000)


def test_node_mode_handoff_is_byte_exact_and_outlives_the_writer(master: MooncakeMaster,
                                                                 node_client: MooncakeNodeClient) -> None:
    config = _node_config(master, node_client)
    backend = MooncakeBackend(config)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sent, back = _keys("node-p2d", 3), _keys("node-d2p", 2)
    proc = ctx.Process(target=_peer, args=(config, sent, back, child), daemon=True)
    try:
        cache = _cache_from(backend, seed=1)
        cache[3, 0, 0, 0, 0, 0] = float("nan")
        backend.register_cache(cache)  # allocate() registered it already: a no-op
        backend.put_cache_blocks(cache, [5, 3, 0], sent)
        proc.start()
        loaded = _recv(parent, "loaded")
        assert _bytes(loaded[2:5]) == _bytes(cache[[5, 3, 0]])
        assert not loaded[[0, 1, 5, 6, 7]].any()

        theirs = _recv(parent, "stored")
        parent.send("die")  # exits without closing its client, like a crashed worker
        proc.join(timeout=30)
        assert proc.exitcode == 0
        # the blocks live in the node client's segment, not in the dead process
        mine = _cache_from(backend)
        backend.get_cache_blocks(mine, [6, 1], back)
        assert _bytes(mine[[6, 1]]) == _bytes(theirs)

        with pytest.raises(BlockMissing):
            backend.get_cache_blocks(mine, [0], _keys("node-absent", 1))
        value, absent = _keys("node-value", 2)
        backend.put_values([value], [b"abcd"])  # commit records work through the node client too
        assert backend.get_values([value, absent]) == [b"abcd", None]
        with pytest.raises(KVStoreError, match="allocate"):
            backend.register_cache(torch.zeros(SHAPE))  # the node client cannot see private memory
        with pytest.raises(KVStoreError, match="one node-mode client per process"):
            MooncakeBackend(config)
    finally:
        backend.close()
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
    MooncakeBackend(config).close()  # attaching again after close() is fine


@pytest.mark.slow
def test_node_client_loss_raises_store_unavailable(master: MooncakeMaster, tmp_path: Path) -> None:
    node = MooncakeNodeClient(NodeClientConfig(master.rpc_address, master.metadata_url,
                                               global_segment_size=16 << 20,
                                               log_path=str(tmp_path / "node.log"))).start()
    backend = None
    try:
        backend = MooncakeBackend(_node_config(master, node))
        cache = _cache_from(backend, seed=10)
        keys = _keys("node-loss", 2)
        backend.put_cache_blocks(cache, [0, 1], keys)
        node.stop(grace_s=0)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):  # the first call notices (Mooncake's RPC timeout)
            backend.get_cache_blocks(cache, [2, 3], keys)
        while backend.healthy():
            assert time.monotonic() - t0 < 20, "client never noticed the node client is gone"
            time.sleep(0.1)
        for op in (lambda: backend.put_cache_blocks(cache, [4], _keys("node-loss", 1)),
                   lambda: backend.get_cache_blocks(cache, [5], keys[:1]),
                   lambda: backend.exists(keys)):
            t = time.monotonic()
            with pytest.raises(StoreUnavailable):
                op()
            assert time.monotonic() - t < 2
        assert _bytes(cache[[0, 1]]) == _bytes(_random_cache(seed=10)[[0, 1]])
    finally:
        if backend is not None:
            backend.close()
        node.stop()
