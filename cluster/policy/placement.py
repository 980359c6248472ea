"""Placement: which prefill worker and which decode worker serve a request.

Pure (stdlib only): the router actor and `pdcluster simulate` call the same `place`, so the planner
predicts the placements the router makes.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, replace

from .prefix_affinity import matched_prefix_blocks

PREFILL_ROLES = frozenset({"prefill", "both"})
DECODE_ROLES = frozenset({"decode", "both"})


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


@dataclass(frozen=True)
class Placement:
    prefill: str | None  # None when colocated: the decode worker computes the prompt too
    decode: str


def decode_blocks_needed(prompt_len: int, max_tokens: int, block_size: int) -> int:
    """KV blocks a request holds on its decode worker at its longest."""
    return -(-(prompt_len + max_tokens) // block_size)


def choices_blocks_needed(prompt_len: int, max_tokens: int, n: int, block_size: int) -> int:
    """KV blocks n choices of one prompt hold at once at their longest: the prompt's full blocks
    once (shared through the prefix cache), the rest per choice."""
    shared = prompt_len // block_size
    return shared + n * (decode_blocks_needed(prompt_len, max_tokens, block_size) - shared)


def longest_choices(prompt_len: int, n: int, pool_blocks: int, block_size: int) -> int:
    """The most tokens each of n choices of one prompt may generate for all of them to fit
    `pool_blocks` at once (`choices_blocks_needed`); below 1 when not even one token each fits."""
    shared = prompt_len // block_size
    return (shared + (pool_blocks - shared) // n) * block_size - prompt_len


def place_decode(workers: Sequence[WorkerLoad], needed_blocks: int) -> str | None:
    """`pick_decode`, and when no worker has room right now the least busy healthy one: its engine
    holds the request until blocks free up (admission already bounds how many run at once)."""
    return pick_decode(workers, needed_blocks) or pick_decode(
        [replace(w, max_running_seqs=None, free_blocks=w.total_blocks) for w in workers], 0)


def place(workers: Sequence[WorkerLoad], prefix_hashes: Sequence[str], needed_blocks: int,
          block_size: int, colocated: bool) -> Placement | None:
    """Both workers of an admitted request; None when a pool it needs has no healthy worker."""
    prefill = None
    if not colocated:
        prefill = pick_prefill(workers, prefix_hashes, block_size)
        if prefill is None:
            return None
    decode = place_decode(workers, needed_blocks)
    return None if decode is None else Placement(prefill, decode)
