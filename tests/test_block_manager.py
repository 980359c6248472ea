"""Paged blocks: ref counts, hash-chained prefix reuse, LRU eviction, and no leaks."""
from __future__ import annotations

from pdcluster.engine.block_manager import BlockManager
from pdcluster.engine.prefix_hash import block_hashes
from pdcluster.engine.sampling import SamplingParams
from pdcluster.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    assert bm.admit(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_chain_hash_depends_on_whole_prefix():
    a = block_hashes(list(range(32)), 16)
    b = block_hashes([99] + list(range(1, 32)), 16)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]      # block 1 tokens equal, prefix differs
    assert block_hashes(list(range(40)), 16) == a              # partial block not hashed
    assert block_hashes(list(range(32)), 16, salt=b"other") != a
    assert block_hashes(list(range(48)), 16, parent=a[1], start=2) == block_hashes(list(range(48)), 16)[2:]


def test_shared_prefix_blocks_are_reused_and_refcounted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10), "a")
    run_prefill(bm, a)
    b = seq(list(range(8)) + [50, 51, 52], "b")
    assert bm.admit(b, b.num_tokens)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.release(a)
    bm.release(b)
    assert bm.num_free_blocks == 16


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, seq(range(8), "a"))
    again = seq(range(8), "b")                 # same 8 tokens: 2 full cached blocks
    assert bm.admit(again, 8)
    assert again.num_computed_tokens == 4      # block 2 recomputed so there are logits to sample


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8), "a")
    run_prefill(bm, a)
    bm.release(a)
    b = seq(list(range(8)) + [7], "b")
    assert bm.admit(b, b.num_tokens) and b.num_cached_tokens == 8
    bm.release(b)
    c = seq(range(100, 116), "c")              # needs all 4 blocks: evicts the cached ones
    assert bm.admit(c, 16)
    assert bm.cached == {} or all(bm.block_hash[v] == h for h, v in bm.cached.items())
    bm.release(c)
    d = seq(list(range(8)) + [1], "d")
    assert bm.admit(d, d.num_tokens) and d.num_cached_tokens == 0


def test_admit_fails_atomically_when_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq(range(13))
    assert not bm.admit(s, 13)
    assert bm.num_free_blocks == 3 and s.block_table == []
    assert bm.admit(s, 8)                      # a chunk that fits
    assert len(s.block_table) == 2
    assert not bm.reserve(s, 13)
    assert len(s.block_table) == 2
