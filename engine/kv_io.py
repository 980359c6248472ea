"""Moves a sequence's KV between this engine's paged cache and a shared store."""
from __future__ import annotations

import hashlib
import logging
import time
from array import array
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .distributed import gather_objects, get_tp, min_over_ranks
from .kv_connector import KVConnector
from .kv_handoff import BlockRef, KVHandoff, KVLayout, block_checksum, store_key
from .sequence import Sequence

# Export (prefill side): after the prompt is computed, every prompt block is written under its chain
# hash key and described in a `KVHandoff`. Import (decode side, and the prefill side's store-backed
# prefix cache): when a sequence is admitted its blocks are filled from the store, checked, and only
# what could not be loaded is recomputed.

log = logging.getLogger(__name__)


@dataclass
class KVCounters:
    """KV traffic of one engine (`EngineStats` extends it, so its fields appear there by name)."""
    kv_blocks_saved: int = 0
    kv_blocks_loaded: int = 0
    kv_bytes_saved: int = 0
    kv_bytes_loaded: int = 0
    kv_save_seconds: float = 0.0
    kv_load_seconds: float = 0.0
    kv_recomputed_tokens: int = 0          # handed-off prompt tokens that had to be recomputed
    kv_corrupt_blocks: int = 0
    kv_missing_blocks: int = 0
    store_prefix_hit_tokens: int = 0    # prompt tokens found in the store instead of computed


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
        keys = self.prompt_block_keys(seq)
        block_ids = seq.block_table[:len(keys)]
        refs: list[BlockRef] = []
        if self.connector is not None and keys:
            sums = [block_checksum(self.cache[b], n) for (_, n), b in zip(keys, block_ids)]
            bs = self.bm.block_size
            t0 = _now()
            try:  # a partial last block is never a prefix hit: no commit record for it
                ok = self.connector.save([k for k, _ in keys], block_ids,
                                         [c if n == bs else None for (_, n), c in zip(keys, sums)])
            except Exception as exc:           # store down: decode will recompute the prompt
                log.warning("kv export of %s failed: %s", seq.request_id, exc)
                ok = [False] * len(keys)
            self.counters.kv_save_seconds += _now() - t0
            for (key, n), crc, good in zip(keys, sums, ok):
                if not good:
                    break                      # a gap would be useless: decode loads a prefix
                refs.append(BlockRef(key, n, crc))
            self.counters.kv_blocks_saved += len(refs)
            self.counters.kv_bytes_saved += len(refs) * self.layout.block_nbytes
        # TP: every rank saved its own shard; the manifest carries each rank's refs (all ranks
        # export the same sequence in the same step, so the gather lines up)
        per_rank = gather_objects(tuple(refs))
        return KVHandoff(
            request_id=seq.request_id, model_fingerprint=self.fingerprint, layout=self.layout,
            token_ids=tuple(seq.token_ids[:seq.num_prompt_tokens]),
            first_token=seq.token_ids[seq.num_prompt_tokens], blocks=per_rank[0],
            num_cached_tokens=seq.num_cached_tokens, follower_blocks=tuple(per_rank[1:]))

    # ------------------------------------------------------------------ import
    def on_admit(self, seq: Sequence) -> None:
        """Scheduler hook: fill a just-admitted sequence's blocks from the store where possible."""
        if seq.kv_import is not None:
            self._import_handoff(seq, seq.kv_import)
            seq.kv_import = None
        elif self.connector is not None or get_tp().size > 1:  # TP: every rank joins the agreement
            self._import_store_prefix(seq)

    def _import_handoff(self, seq: Sequence, handoff: KVHandoff) -> None:
        prompt_len = seq.num_prompt_tokens
        tp = get_tp()
        if (handoff.model_fingerprint != self.fingerprint or handoff.layout != self.layout
                or handoff.tp_size != tp.size):
            log.warning("handoff for %s is from another model/layout/TP size; recomputing",
                        seq.request_id)
            self.counters.kv_recomputed_tokens += prompt_len - seq.num_computed_tokens
            return
        bs = self.bm.block_size
        first = seq.num_computed_tokens // bs          # blocks already local (prefix cache)
        refs = list(handoff.blocks_of_rank(tp.rank)[first:])
        loaded = self._load(seq, first, refs)
        full = [r for r in refs[:loaded] if r.num_tokens == bs]
        if full:  # verified: their records (if lost) can be restored for the prefix cache
            try:
                self.connector.commit([r.key for r in full], [r.checksum for r in full])
            except Exception as exc:
                log.warning("committing the blocks of %s failed: %s", seq.request_id, exc)
        covered = first * bs + sum(r.num_tokens for r in refs[:loaded])
        seq.num_computed_tokens = max(seq.num_computed_tokens, min(covered, prompt_len))
        self.counters.kv_recomputed_tokens += prompt_len - seq.num_computed_tokens
        self.bm.commit(seq)

    def _import_store_prefix(self, seq: Sequence) -> None:
        bs = self.bm.block_size
        first = seq.num_computed_tokens // bs
        last = (seq.num_tokens - 1) // bs              # keep the last token to compute
        hashes = self.bm.hashes_of(seq)[first:last]
        if not hashes:
            return
        keys = [store_key(h) for h in hashes]
        sums: list[int | None] = []                   # no store here: load nothing, still agree
        if self.connector is not None:
            try:
                sums = self.connector.committed(keys)
            except Exception as exc:
                log.warning("store prefix lookup failed: %s", exc)
        run = next((i for i, c in enumerate(sums) if c is None), len(sums))
        run = max(0, run - 1) if self.bm.drop_last_hit else run   # see BlockManager.drop_last_hit
        refs = [BlockRef(k, bs, c) for k, c in zip(keys[:run], sums)]
        loaded = self._load(seq, first, refs)
        if loaded:
            seq.num_computed_tokens = (first + loaded) * bs
            seq.num_cached_tokens = seq.num_computed_tokens
            self.counters.store_prefix_hit_tokens += loaded * bs
            self.bm.commit(seq)

    def _load(self, seq: Sequence, first: int, refs: list[BlockRef]) -> int:
        """Load refs into seq's blocks from index `first`; returns how many leading blocks are good:
        loaded and matching their checksum (the manifest's, or for a store prefix the commit record's).

        TP: each rank loads its own shard, and the ranks agree twice — on how many blocks to try
        before reserving (their block managers must stay identical) and on the shortest good run
        (a block missing or corrupt on one rank is recomputed by all)."""
        if self.connector is None:
            self.counters.kv_missing_blocks += len(refs)
        refs = refs[:min_over_ranks(len(refs) if self.connector is not None else 0,
                                    self.cache.device)]
        if not refs:
            return 0
        bs = self.bm.block_size
        upto = (first + len(refs)) * bs
        while refs and not self.bm.reserve(seq, upto):
            refs.pop()                                  # pool is tight: load fewer blocks
            upto -= bs
        block_ids = seq.block_table[first:first + len(refs)]
        t0 = _now()
        try:
            ok = self.connector.load([r.key for r in refs], block_ids)
        except Exception as exc:
            log.warning("kv load for %s failed: %s", seq.request_id, exc)
            ok = [False] * len(refs)
        self.counters.kv_load_seconds += _now() - t0
        good = 0
        for ref, b, fine in zip(refs, block_ids, ok):
            if not fine:
                self.counters.kv_missing_blocks += 1
                break
            if block_checksum(self.cache[b], ref.num_tokens) != ref.checksum:
                log.warning("block %s of %s failed its checksum; recomputing from there",
                            ref.key, seq.request_id)
                self.counters.kv_corrupt_blocks += 1
                break
            good += 1
        good = min_over_ranks(good, self.cache.device)
        self.counters.kv_blocks_loaded += good
        self.counters.kv_bytes_loaded += good * self.layout.block_nbytes
        return good


_now = time.perf_counter
