"""Same-host store reads (cluster/same_host.py) without a store: a segment advert is honoured only for the
very memfd it names, on this host, and replica addresses translate only inside the segment."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from pdcluster.cluster.kvstore import same_host
from pdcluster.engine.kv_connector import mark_transfer_thread


@pytest.fixture
def segment():
    seg = same_host.SharedSegment(1 << 20)
    view = mmap.mmap(seg.fd, seg.size)  # stands in for Mooncake's mapping of the mounted segment
    yield seg, view
    view.close()
    seg.close()


def test_advert_names_the_mapping_and_a_reader_sees_the_owners_bytes(segment) -> None:
    seg, view = segment
    advert = seg.advert()
    view[4096:4100] = b"kv!!"
    peers = same_host.PeerSegments("http://127.0.0.1:9/metadata", own=("127.0.0.1:1234", advert))
    try:
        m = peers.acquire("127.0.0.1:1234")
        assert m is not None
        peers.release(m)
        src = m.translate(advert.base + 4096, 4)
        out = torch.zeros(4, dtype=torch.uint8)
        same_host.copy_spans([(out.data_ptr(), src, 4)])
        assert bytes(out.numpy()) == b"kv!!"
        view[4096:4100] = b"new!"  # a shared mapping, not a snapshot
        same_host.copy_spans([(out.data_ptr(), src, 4)])
        assert bytes(out.numpy()) == b"new!"
        # only whole spans inside the segment translate
        assert m.translate(advert.base - 1, 4) is None
        assert m.translate(advert.base + seg.size - 3, 4) is None
        assert m.translate(advert.base + seg.size - 4, 4) is not None
    finally:
        peers.forget()


@pytest.mark.parametrize("change", [dict(ino=1), dict(boot_id="another-host"), dict(fd=9999),
                                    dict(size=2 << 20)])
def test_an_advert_that_does_not_name_this_memfd_here_is_not_mapped(segment, change) -> None:
    seg, _ = segment
    wrong = replace(seg.advert(), **change)
    peers = same_host.PeerSegments("http://127.0.0.1:9/metadata", own=("127.0.0.1:1234", wrong))
    try:
        assert peers.acquire("127.0.0.1:1234") is None
    finally:
        peers.forget()


def test_an_endpoint_without_an_advert_is_remote() -> None:
    peers = same_host.PeerSegments("http://127.0.0.1:9/metadata")  # nothing listens there
    assert peers.acquire("10.0.0.7:12345") is None
    peers.forget()


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["streaming", "memmove"])
def test_copy_spans_splits_large_copies_and_lands_every_byte(kernels, monkeypatch) -> None:
    monkeypatch.setenv("PDCLUSTER_CPU_KERNELS", kernels)
    same_host.stream_copier.cache_clear()
    try:
        if kernels == "1" and same_host.stream_copier() is None:
            pytest.skip("no C compiler to build the streaming-copy kernel")
        blocks, size = 24, 737_280  # ~17.7 MB: above the thresholds for the pool and streaming stores
        src = torch.randint(0, 256, (blocks, size), dtype=torch.uint8)
        dst = torch.zeros_like(src)
        order = torch.randperm(blocks).tolist()
        spans = [(dst[i].data_ptr(), src[j].data_ptr(), size) for i, j in enumerate(order)]
        same_host.copy_spans(spans)
        assert torch.equal(dst, src[order])
    finally:
        same_host.stream_copier.cache_clear()


def test_a_kv_transfer_thread_copies_on_itself_alone_while_others_fan_out(monkeypatch) -> None:
    # the step keeps the engine's cores while a transfer runs: the transfer must not take them
    threads_used: list[str] = []

    def recording_copy(spans):
        threads_used.append(threading.current_thread().name)
        for dst, src, n in spans:
            ctypes.memmove(dst, src, n)

    monkeypatch.setattr(same_host, "stream_copier", lambda: recording_copy)
    monkeypatch.setattr(same_host, "_copy_threads", lambda: 4)
    blocks, size = 8, 2 << 20  # 16 MiB: above the pool's threshold
    src = torch.randint(0, 256, (blocks, size), dtype=torch.uint8)

    def copy_all() -> torch.Tensor:
        dst = torch.zeros_like(src)
        same_host.copy_spans([(dst[i].data_ptr(), src[i].data_ptr(), size) for i in range(blocks)])
        return dst

    assert torch.equal(copy_all(), src)
    assert len(threads_used) == 4 and all(name.startswith("kv-copy") for name in threads_used)
    threads_used.clear()
    with ThreadPoolExecutor(1, thread_name_prefix="kv-transfer", initializer=mark_transfer_thread) as pool:
        assert torch.equal(pool.submit(copy_all).result(), src)
    assert len(threads_used) == 1 and threads_used[0].startswith("kv-transfer")


def test_streaming_copy_handles_unaligned_ends_and_leaves_neighbours_alone() -> None:
    copy = same_host.stream_copier()
    if copy is None:
        pytest.skip("no C compiler to build the streaming-copy kernel")
    src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    for dst_off, src_off, n in [(0, 0, 0), (1, 3, 1), (7, 0, 63), (13, 5, 255), (63, 1, 257),
                                (64, 64, 4096), (3, 9, 40_001)]:
        dst = torch.zeros(n + 256, dtype=torch.uint8)
        at = 128 + dst_off
        copy([(dst.data_ptr() + at, src.data_ptr() + src_off, n)])
        assert torch.equal(dst[at:at + n], src[src_off:src_off + n]), (dst_off, src_off, n)
        assert not dst[:at].any() and not dst[at + n:].any(), "wrote outside the span"


def _mappings_of(advert) -> int:
    """This process's mappings of the advertised file: same device and inode (an inode number alone
    can be a library's on another filesystem)."""
    def file_of(fields: list[str]) -> tuple[int, int]:
        major, minor = fields[3].split(":")
        return os.makedev(int(major, 16), int(minor, 16)), int(fields[4])

    with open("/proc/self/maps") as f:
        rows = [line.split() for line in f]
    return sum(1 for fields in rows if len(fields) >= 6 and file_of(fields) == (advert.dev, advert.ino))


def test_a_dropped_segment_stays_mapped_while_a_copy_uses_it(segment) -> None:
    seg, view = segment
    advert = seg.advert()
    view[0:4] = b"live"
    peers = same_host.PeerSegments("http://127.0.0.1:9/metadata", own=("127.0.0.1:1234", advert))
    held = peers.acquire("127.0.0.1:1234")
    assert held is not None and _mappings_of(advert) == 2  # the owner's and the reader's
    seg.close()  # the owner lets go of the memfd: /proc/<pid>/fd/<fd> no longer names it
    assert peers.acquire("127.0.0.1:1234") is None  # dropped for new copies...
    out = torch.zeros(4, dtype=torch.uint8)
    same_host.copy_spans([(out.data_ptr(), held.translate(advert.base, 4), 4)])
    assert bytes(out.numpy()) == b"live"  # ...but the copy in flight still reads it
    peers.release(held)
    assert _mappings_of(advert) == 1  # unmapped by its last user
    peers.forget()
