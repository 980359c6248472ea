"""Prefix affinity: the chain hashes of a prompt's full blocks, and which worker served them lately.

Pure and stdlib-only; the router steers a repeated prefix to the prefill worker likely to hold it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence, Set

from ...engine.prefix_hash import block_hashes


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[str]:
    """Hex chain hashes of the full blocks of `token_ids`.

    h_i = sha256(h_{i-1} || salt || token ids of block i as little-endian int32), h_{-1} = b"" (the raw
    32-byte digest is chained, the hex form is returned); a trailing partial block is not hashed.
    This is the engine's `block_hashes` in hex, so router affinity and store keys name the same blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return [h.hex() for h in block_hashes(token_ids, block_size, salt)]


def matched_prefix_blocks(prefix_hashes: Sequence[str], cached: Set[str]) -> int:
    """Number of leading blocks of the request found in `cached` (a chain hash names its whole prefix,
    so the first miss ends the match)."""
    n = 0
    for h in prefix_hashes:
        if h not in cached:
            break
        n += 1
    return n


class PrefixIndex:
    """Which block hashes each worker served recently: the router's affinity memory.

    Bounded per worker (least recently served hashes are forgotten first), since it only has to steer
    repeats of hot prefixes, not mirror the workers' caches.
    """

    def __init__(self, capacity_per_worker: int = 65536) -> None:
        self._capacity = capacity_per_worker
        self._recent: dict[str, OrderedDict[str, None]] = {}

    def record(self, worker_id: str, prefix_hashes: Iterable[str]) -> None:
        recent = self._recent.setdefault(worker_id, OrderedDict())
        for h in prefix_hashes:
            recent[h] = None
            recent.move_to_end(h)
        while len(recent) > self._capacity:
            recent.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        """Drop a worker's entries (it restarted or left: its cache is gone)."""
        self._recent.pop(worker_id, None)

    def view(self, worker_id: str) -> Set[str]:
        """A live read-only set of the worker's recent hashes (no copy: cheap per request)."""
        return self._recent.setdefault(worker_id, OrderedDict()).keys()
