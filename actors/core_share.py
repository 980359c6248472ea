"""An engine's share of its host's cores, resized before each step to take the cores the host's other
engines leave idle (the rule is `cluster.policy.engine_threads.step_threads`), and the board in
shared memory through which the engines of one host see each other.

The engines of one host (a prefill and a decode worker on one machine, say) post on a board in
shared memory how many threads they are stepping with while they have work, and 0 while they idle.
The board is one small file in /dev/shm (per user): an engine takes one of its 8-byte slots by
holding an open-file-description lock on that slot's bytes for as long as it lives; the kernel
drops the lock when the process dies, so a dead engine's last post is told from a live one's and
ignored. Posts are single aligned stores, read without a lock: a reader sees the old or the new
count, and the next step reads again.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct

from ..cluster.policy.engine_threads import EXPAND_FROM_SEQS, expand_from_seqs, step_threads

log = logging.getLogger(__name__)

SLOTS = 64
_SLOT = struct.calcsize("q")
# PDCLUSTER_CORE_BOARD: another board (engines that should not see this host's others)
DEFAULT_PATH = os.environ.get("PDCLUSTER_CORE_BOARD", f"/dev/shm/pdcluster-cores-{os.getuid()}")
# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (open-file-description locks)
_FLOCK = "hh4xqqi4x"


class CoreBoard:
    """This process's slot on its host's board. Raises OSError when the board cannot be opened or
    has no free slot."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # allocated, not just sized: a store into a page tmpfs cannot back is a SIGBUS
            os.posix_fallocate(fd, 0, SLOTS * _SLOT)
            self.slot = next((i for i in range(SLOTS) if _lock(fd, i, fcntl.F_OFD_SETLK)), None)
            if self.slot is None:
                raise OSError(f"no free slot on {path} ({SLOTS} engines on this host)")
            self._map = mmap.mmap(fd, SLOTS * _SLOT)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._counts = memoryview(self._map).cast("q")
        self.post(0)

    def post(self, threads: int) -> None:
        """This engine is stepping on `threads` threads (0: idle)."""
        self._counts[self.slot] = threads

    def others_busy(self) -> int:
        """The threads the host's other live engines are stepping with."""
        busy = 0
        for slot, count in enumerate(self._counts.tolist()):
            if count and slot != self.slot and not _lock(self._fd, slot, fcntl.F_OFD_GETLK):
                busy += count   # its slot is locked: its engine is alive
        return busy

    def close(self) -> None:
        self.post(0)
        self._counts.release()
        self._map.close()
        os.close(self._fd)   # drops the slot's lock


def _lock(fd: int, slot: int, cmd: int) -> bool:
    """F_OFD_SETLK: take slot's lock, True if taken. F_OFD_GETLK: True if nobody else holds it."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, slot * _SLOT, _SLOT, 0)
    try:
        answer = fcntl.fcntl(fd, cmd, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):   # SETLK: held by another engine
            return False
        raise
    return cmd == fcntl.F_OFD_SETLK or struct.unpack(_FLOCK, answer)[0] == fcntl.F_UNLCK


class CoreShare:
    """How many threads an engine with `share` threads of its own steps with next, at most `most`;
    posted on `board` until `release`."""

    def __init__(self, share: int, most: int, board: CoreBoard,
                 expand_from: int = EXPAND_FROM_SEQS) -> None:
        self.share, self.most, self.board = share, max(share, most), board
        self.expand_from = expand_from   # fewest decode sequences a step takes idle cores for
        self._posted = 0

    @classmethod
    def open(cls, share: int, most: int, path: str = DEFAULT_PATH,
             stream_interval: int = 1) -> CoreShare | None:
        """A share on this host's board (`most` 0: none, fixed threads), or None where the board
        cannot be had; `stream_interval`: how many tokens at a time the engine's streams leave it
        (engine.stream_interval), which decides from how many sequences a step takes idle cores."""
        if most < 1:
            return None
        if not hasattr(fcntl, "F_OFD_SETLK"):   # open-file-description locks are Linux's
            log.warning("engine threads stay at %d: no open-file-description locks here", share)
            return None
        try:
            return cls(share, most, CoreBoard(path), expand_from_seqs(stream_interval))
        except OSError as exc:
            log.warning("engine threads stay at %d: the host's core board is unavailable (%s)", share, exc)
            return None

    def claim(self, decode_seqs: int) -> int:
        """Threads for the next step, which decodes `decode_seqs` sequences (0: prompt work),
        posted as this engine's until released or claimed again."""
        threads = step_threads(self.share, self.most, self.board.others_busy(), decode_seqs,
                               self.expand_from)
        if threads != self._posted:
            self.board.post(threads)
            self._posted = threads
        return threads

    def release(self) -> None:
        """This engine has no work: its cores are the others'."""
        if self._posted:
            self.board.post(0)
            self._posted = 0

    def close(self) -> None:
        self.board.close()
