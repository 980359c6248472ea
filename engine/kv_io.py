"""Moves a sequence's KV between this engine's paged cache and a shared store."""
from __future__ import annotations

import hashlib
import logging
import time
from array import array
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .distributed import gather_objects, get_tp, min_over_ranks
from .kv_connector import KVConnector
from .kv_handoff import BlockRef, KVHandoff, KVLayout, block_checksum, store_key
from .sequence import Sequence
from .stats import KVCounters

# Export (prefill side): after the prompt is computed, every prompt block is written under its chain
# hash key and described in a `KVHandoff`. Import (decode side, and the prefill side's store-backed
# prefix cache): when a sequence is admitted its blocks are filled from the store, checked, and only
# what could not be loaded is recomputed.

log = logging.getLogger(__name__)


@dataclass(eq=False)
class KVLoad:
    """Blocks of one sequence being filled from the store: planned and finished on the step thread,
    transferred (read and checksummed) by `transfer`, which may run on another thread."""
    seq: Sequence
    first: int                       # index in seq's block table of the first block to load
    refs: list[BlockRef]
    block_ids: list[int]
    from_handoff: bool               # a handoff's blocks (else a store prefix hit)
    good: int = 0                    # leading blocks loaded and verified, on this rank
    missing: int = 0
    corrupt: int = 0
    seconds: float = 0.0


@dataclass(eq=False)
class KVSave:
    """A prefill's prompt blocks being written to the store (see `KVLoad`)."""
    seq: Sequence
    keys: list[tuple[str, int]]      # (key, tokens) per prompt block
    block_ids: list[int]
    refs: list[BlockRef] = field(default_factory=list)  # the blocks stored, in order, on this rank
    seconds: float = 0.0


class KVExchange:
    def __init__(self, cache: torch.Tensor, bm: BlockManager, layout: KVLayout,
                 fingerprint: str) -> None:
        self.cache = cache
        self.bm = bm
        self.layout = layout
        self.fingerprint = fingerprint
        self.connector: KVConnector | None = None
        self.counters = KVCounters()

    # ------------------------------------------------------------------ keys
    def prompt_block_keys(self, seq: Sequence) -> list[tuple[str, int]]:
        """(key, tokens) for every block holding prompt tokens. Full blocks are keyed by their chain
        hash (shared cluster-wide, the prefix cache). A partial last block is never a prefix-cache
        hit, and the same tokens computed in another batch can differ in the last bits, so its key
        also names the request: a repeated prompt must not find an older copy whose checksum
        differs from the one in its manifest."""
        bs = self.bm.block_size
        full = seq.num_prompt_tokens // bs
        hashes = self.bm.hashes_of(seq)[:full]
        keys = [(store_key(h), bs) for h in hashes]
        rest = seq.num_prompt_tokens - full * bs
        if rest:
            tail = array("i", seq.token_ids[full * bs: seq.num_prompt_tokens]).tobytes()
            parent = hashes[-1] if hashes else b""
            h = hashlib.sha256(parent + self.bm.salt + b"partial/" + seq.request_id.encode()
                               + tail).digest()
            keys.append((store_key(h), rest))
        return keys

    # ------------------------------------------------------------------ export
    def export(self, seq: Sequence) -> KVHandoff:
        """Write seq's prompt blocks to the store (if any) and describe them for the decoder."""
        save = self.plan_save(seq)
        self.transfer(save)
        return self.finish_save(save)

    def plan_save(self, seq: Sequence) -> KVSave:
        keys = self.prompt_block_keys(seq) if self.connector is not None else []
        return KVSave(seq, keys, seq.block_table[:len(keys)])

    def finish_save(self, save: KVSave) -> KVHandoff:
        """Count what `transfer(save)` stored and describe it (step thread: with TP this gathers
        every rank's refs)."""
        seq, refs = save.seq, save.refs
        self.counters.kv_save_seconds += save.seconds
        self.counters.kv_blocks_saved += len(refs)
        self.counters.kv_bytes_saved += len(refs) * self.layout.block_nbytes
        # TP: every rank saved its own shard; the manifest carries each rank's refs (all ranks
        # finish the same sequence in the same step, so the gather lines up)
        per_rank = gather_objects(tuple(refs))
        return KVHandoff(
            request_id=seq.request_id, model_fingerprint=self.fingerprint, layout=self.layout,
            token_ids=tuple(seq.token_ids[:seq.num_prompt_tokens]),
            first_token=seq.token_ids[seq.num_prompt_tokens], blocks=per_rank[0],
            num_cached_tokens=seq.num_cached_tokens, follower_blocks=tuple(per_rank[1:]))

    # ------------------------------------------------------------------ import
    def plan_import(self, seq: Sequence) -> KVLoad | None:
        """For a just-admitted sequence: which of its blocks to fill from the store (a handoff's,
        or a prefix the store holds), with the blocks reserved; None when there is nothing to load
        (what cannot be loaded is computed). Step thread: with TP the ranks agree here."""
        if seq.kv_import is not None:
            handoff, seq.kv_import = seq.kv_import, None
            return self._plan_handoff(seq, handoff)
        if self.connector is not None or get_tp().size > 1:  # TP: every rank joins the agreement
            return self._plan_store_prefix(seq)
        return None

    def finish_import(self, load: KVLoad) -> None:
        """Apply a transferred load: the ranks agree on the leading good blocks, which count as
        computed; the rest of the prompt is recomputed."""
        c = self.counters
        c.kv_load_seconds += load.seconds
        c.kv_missing_blocks += load.missing
        c.kv_corrupt_blocks += load.corrupt
        good = min_over_ranks(load.good, self.cache.device)
        c.kv_blocks_loaded += good
        c.kv_bytes_loaded += good * self.layout.block_nbytes
        seq, bs = load.seq, self.bm.block_size
        if load.from_handoff:
            full = [r for r in load.refs[:good] if r.num_tokens == bs]
            if full:  # verified: their records (if lost) can be restored for the prefix cache
                try:
                    self.connector.commit([r.key for r in full], [r.checksum for r in full])
                except Exception as exc:
                    log.warning("committing the blocks of %s failed: %s", seq.request_id, exc)
            covered = load.first * bs + sum(r.num_tokens for r in load.refs[:good])
            seq.num_computed_tokens = max(seq.num_computed_tokens, min(covered, seq.num_prompt_tokens))
            c.kv_recomputed_tokens += seq.num_prompt_tokens - seq.num_computed_tokens
            self.bm.commit(seq)
        elif good:
            seq.num_computed_tokens = (load.first + good) * bs
            seq.num_cached_tokens = seq.num_computed_tokens
            c.store_prefix_hit_tokens += good * bs
            self.bm.commit(seq)

    def on_admit(self, seq: Sequence) -> None:
        """Scheduler hook of the synchronous path: fill a just-admitted sequence's blocks from the
        store before it is scheduled."""
        load = self.plan_import(seq)
        if load is not None:
            self.transfer(load)
            self.finish_import(load)

    def _plan_handoff(self, seq: Sequence, handoff: KVHandoff) -> KVLoad | None:
        tp = get_tp()
        if (handoff.model_fingerprint != self.fingerprint or handoff.layout != self.layout
                or handoff.tp_size != tp.size):
            log.warning("handoff for %s is from another model/layout/TP size; recomputing",
                        seq.request_id)
            self.counters.kv_recomputed_tokens += seq.num_prompt_tokens - seq.num_computed_tokens
            return None
        first = seq.num_computed_tokens // self.bm.block_size    # blocks already local (prefix cache)
        load = self._plan_load(seq, first, list(handoff.blocks_of_rank(tp.rank)[first:]), True)
        if load is None:
            self.counters.kv_recomputed_tokens += seq.num_prompt_tokens - seq.num_computed_tokens
        return load

    def _plan_store_prefix(self, seq: Sequence) -> KVLoad | None:
        bs = self.bm.block_size
        first = seq.num_computed_tokens // bs
        last = (seq.num_tokens - 1) // bs              # keep the last token to compute
        hashes = self.bm.hashes_of(seq)[first:last]
        if not hashes:                                 # the same on every TP rank
            return None
        keys = [store_key(h) for h in hashes]
        sums: list[int | None] = []                   # no store here: load nothing, still agree
        if self.connector is not None:
            try:
                sums = self.connector.committed(keys)
            except Exception as exc:
                log.warning("store prefix lookup failed: %s", exc)
        run = next((i for i, c in enumerate(sums) if c is None), len(sums))
        run = max(0, run - 1) if self.bm.drop_last_hit else run   # see BlockManager.drop_last_hit
        return self._plan_load(seq, first, [BlockRef(k, bs, c) for k, c in zip(keys[:run], sums)],
                               False)

    def _plan_load(self, seq: Sequence, first: int, refs: list[BlockRef],
                   from_handoff: bool) -> KVLoad | None:
        """Reserve blocks for `refs` from block index `first` on. TP: the ranks agree on how many
        blocks to try before reserving (their block managers must stay identical)."""
        if self.connector is None:
            self.counters.kv_missing_blocks += len(refs)
        refs = refs[:min_over_ranks(len(refs) if self.connector is not None else 0,
                                    self.cache.device)]
        bs = self.bm.block_size
        upto = (first + len(refs)) * bs
        while refs and not self.bm.reserve(seq, upto):
            refs.pop()                                  # pool is tight: load fewer blocks
            upto -= bs
        if not refs:
            return None
        return KVLoad(seq, first, refs, seq.block_table[first:first + len(refs)], from_handoff)

    # ------------------------------------------------------------------ the transfer itself
    def transfer(self, job: KVLoad | KVSave) -> None:
        """Move a planned job's bytes and checksum them; safe on a thread other than the step's
        (it touches only the job's own blocks and the connector). Never raises: a failure is a
        block not loaded (recomputed) or not stored (recomputed by decode)."""
        t0 = _now()
        if isinstance(job, KVLoad):
            self._read(job)
        else:
            self._write(job)
        job.seconds = _now() - t0

    def _read(self, load: KVLoad) -> None:
        refs = load.refs
        try:
            ok = self.connector.load([r.key for r in refs], load.block_ids)
        except Exception as exc:
            log.warning("kv load for %s failed: %s", load.seq.request_id, exc)
            ok = [False] * len(refs)
        for ref, b, fine in zip(refs, load.block_ids, ok):
            if not fine:
                load.missing += 1
                break
            if block_checksum(self.cache[b], ref.num_tokens) != ref.checksum:
                log.warning("block %s of %s failed its checksum; recomputing from there",
                            ref.key, load.seq.request_id)
                load.corrupt += 1
                break
            load.good += 1

    def _write(self, save: KVSave) -> None:
        if not save.keys:
            return
        bs = self.bm.block_size
        sums = [block_checksum(self.cache[b], n) for (_, n), b in zip(save.keys, save.block_ids)]
        try:  # a partial last block is never a prefix hit: no commit record for it
            ok = self.connector.save([k for k, _ in save.keys], save.block_ids,
                                     [c if n == bs else None for (_, n), c in zip(save.keys, sums)])
        except Exception as exc:           # store down: decode will recompute the prompt
            log.warning("kv export of %s failed: %s", save.seq.request_id, exc)
            ok = [False] * len(save.keys)
        for (key, n), crc, good in zip(save.keys, sums, ok):
            if not good:
                break                      # a gap would be useless: decode loads a prefix
            save.refs.append(BlockRef(key, n, crc))


_now = time.perf_counter
