"""Pure placement policies: which prefill worker and which decode worker serve a request.

No I/O and nothing heavy (stdlib plus the stdlib-only prefix hash), so the router actor, the engine and
the simulator all share these exact rules.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

from pdcluster.engine.prefix_hash import block_hashes

PREFILL_ROLES = frozenset({"prefill", "both"})
DECODE_ROLES = frozenset({"decode", "both"})


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[str]:
    """Hex chain hashes of the full blocks of `token_ids`.

    h_i = sha256(h_{i-1} || salt || token ids of block i as little-endian int32), h_{-1} = b"" (the raw
    32-byte digest is chained, the hex form is returned); a trailing partial block is not hashed.
    This is the engine's `block_hashes` in hex, so router affinity and store keys name the same blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return [h.hex() for h in block_hashes(token_ids, block_size, salt)]


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as the router last saw it."""

    worker_id: str
    role: str  # "prefill", "decode" or "both" (colocated)
    healthy: bool = True
    outstanding_prefill_tokens: int = 0  # prompt tokens queued or being prefilled there
    running_seqs: int = 0  # sequences decoding there (including ones handed off but not yet joined)
    free_blocks: int = 0  # free KV blocks
    total_blocks: int = 0
    cached_prefixes: Set[str] = frozenset()  # block hashes it served recently (PrefixIndex.view)
    max_running_seqs: int | None = None  # the engine's batch cap, if any


def matched_prefix_blocks(prefix_hashes: Sequence[str], cached: Set[str]) -> int:
    """Number of leading blocks of the request found in `cached` (a chain hash names its whole prefix,
    so the first miss ends the match)."""
    n = 0
    for h in prefix_hashes:
        if h not in cached:
            break
        n += 1
    return n


def pick_prefill(workers: Iterable[WorkerLoad], prefix_hashes: Sequence[str] = (),
                 block_size: int = 16) -> str | None:
    """The prefill worker expected to finish this request's prefill first, or None if none is healthy.

    Rule: cost = outstanding prefill tokens - tokens of the request's prefix already cached there
    (matched blocks x block_size); lowest cost wins, ties go to the least outstanding tokens, then the
    worker id. So a worker holding the longest matching prefix is preferred unless it is more loaded
    than the least-loaded worker by more than the prefill work the cache hit saves: affinity never
    costs more than it saves, and a hot prefix spills over to other workers once its owner is busy.
    """
    best: tuple[int, int, str] | None = None
    for w in workers:
        if not w.healthy or w.role not in PREFILL_ROLES:
            continue
        saved = matched_prefix_blocks(prefix_hashes, w.cached_prefixes) * block_size
        key = (w.outstanding_prefill_tokens - saved, w.outstanding_prefill_tokens, w.worker_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def pick_decode(workers: Iterable[WorkerLoad], needed_blocks: int,
                reserve_fraction: float = 0.0) -> str | None:
    """The decode worker with the fewest running sequences (then the most free KV blocks, then the id),
    among healthy decode-capable workers with room; None if nothing fits.

    Fewest running sequences first because a decode step's time grows with the batch, so this evens
    out TPOT across workers. A worker has room when it is under its batch cap and keeps at least
    `reserve_fraction` of its blocks free after taking `needed_blocks` (headroom for the sequences it
    already runs to grow).
    """
    best: tuple[int, int, str] | None = None
    for w in workers:
        if not w.healthy or w.role not in DECODE_ROLES:
            continue
        if w.max_running_seqs is not None and w.running_seqs >= w.max_running_seqs:
            continue
        if w.free_blocks - needed_blocks < reserve_fraction * w.total_blocks:
            continue
        key = (w.running_seqs, -w.free_blocks, w.worker_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


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
