"""Paged KV blocks: allocation, ref counts, and hash-chained prefix reuse.

A block whose tokens are all computed gets the chain hash of its prefix; when its last user
leaves it stays cached (LRU) until the space is needed, so a repeated prefix is not recomputed.
"""
from __future__ import annotations

from collections import OrderedDict

from .prefix_hash import block_hashes
from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: bytes = b"") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                 # hash -> block id
        # Free blocks in eviction order (oldest first); ref-0 cached blocks stay findable by hash.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks, never covering its last token
        (the last token is always computed so there are logits to sample from)."""
        if not self.enable_prefix_caching:
            return []
        hashes = self.hashes_of(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def hashes_of(self, seq: Sequence) -> list[bytes]:
        full = seq.num_tokens // self.block_size
        if len(seq.block_hashes) < full:
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes += block_hashes(seq.token_ids, self.block_size, self.salt,
                                             parent, len(seq.block_hashes))
        return seq.block_hashes[:full]

    # ------------------------------------------------------------------ allocation
    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First scheduling of a waiting sequence: share its cached prefix, allocate the rest for
        `num_new_tokens` beyond it. Returns False (changing nothing) if the pool is too small."""
        hit = self.match_prefix(seq)
        cached_tokens = len(hit) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - cached_tokens)
        need = self.blocks_needed(cached_tokens + num_new_tokens) - len(hit)
        revived = sum(1 for b in hit if self.ref_counts[b] == 0)
        if need + revived > self.num_free_blocks:
            return False
        for b in hit:
            self._ref(b)
        seq.block_table = list(hit)
        seq.num_computed_tokens = cached_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(cached_tokens, seq.num_prompt_tokens)
        self._grow(seq, need)
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover `num_tokens` tokens; False (changing nothing) if it can't."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        self._grow(seq, need)
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back seq's blocks beyond the first `num_tokens` tokens (KV of rejected draft
        tokens): never full, never hashed, so they are reused first."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            b = seq.block_table.pop()
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                self.free.move_to_end(b, last=False)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        hashes = self.hashes_of(seq)
        for i in range(full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = hashes[i]
            self.block_hash[block] = h
            self.cached.setdefault(h, block)

    def release(self, seq: Sequence) -> None:
        # Tail first: the tail goes to the front of the eviction order, the shared head lasts longer.
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    # ------------------------------------------------------------------ internals
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _grow(self, seq: Sequence, n: int) -> None:
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:                 # evict it from the prefix cache
                if self.cached.get(h) == block:
                    del self.cached[h]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
