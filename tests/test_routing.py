"""Placement policies: prefix chain hashes, prefill affinity rule, decode fit/balance rule."""
from __future__ import annotations

import hashlib
import struct

import pytest

from pdcluster.cluster.policy.prefix_affinity import PrefixIndex, prefix_block_hashes
from pdcluster.cluster.policy.placement import (WorkerLoad, choices_blocks_needed, longest_choices, pick_decode,
                                               pick_prefill)


def _by_hand(tokens: list[int], block_size: int, salt: bytes) -> list[str]:
    out, prev = [], b""
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        prev = hashlib.sha256(prev + salt + struct.pack(f"<{block_size}i", *block)).digest()
        out.append(prev.hex())
    return out


def test_prefix_hashes_follow_the_documented_chain_and_skip_partial_blocks():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 49151]
    got = prefix_block_hashes(tokens, 4, b"m/tp0/")
    assert len(got) == 2  # 10 tokens = 2 full blocks of 4 + a partial one
    assert got == _by_hand(tokens, 4, b"m/tp0/")


def test_prefix_hashes_name_whole_prefixes():
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"s")
    b = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 9], 4, b"s")
    c = prefix_block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4, b"s")
    assert a[0] == b[0] and a[1] != b[1]
    assert a[1] != c[1]  # same second block, different first block: different key
    assert prefix_block_hashes([1, 2, 3, 4], 4, b"other")[0] != a[0]
    with pytest.raises(ValueError):
        prefix_block_hashes([1, 2], 0, b"")


def _p(wid: str, outstanding: int, cached: frozenset[str] = frozenset(), **kw) -> WorkerLoad:
    return WorkerLoad(wid, "prefill", outstanding_prefill_tokens=outstanding, cached_prefixes=cached, **kw)


def test_pick_prefill_least_outstanding_without_cache_hits():
    workers = [_p("a", 300), _p("b", 100), _p("c", 100), _p("d", 0, healthy=False),
               WorkerLoad("e", "decode")]
    assert pick_prefill(workers, ["x", "y"], block_size=16) == "b"  # tie b/c broken by id; d, e skipped
    assert pick_prefill([_p("d", 0, healthy=False)], []) is None


def test_pick_prefill_affinity_until_load_gap_exceeds_saved_tokens():
    hashes = ["h0", "h1", "h2", "h3"]
    owner = frozenset(hashes)  # 4 blocks x 16 = 64 prompt tokens it need not recompute
    assert pick_prefill([_p("owner", 100, owner), _p("idle", 50)], hashes, block_size=16) == "owner"
    assert pick_prefill([_p("owner", 200, owner), _p("idle", 50)], hashes, block_size=16) == "idle"
    # Longest match wins among cached workers at equal load.
    two = frozenset(hashes[:2])
    assert pick_prefill([_p("two", 10, two), _p("four", 10, owner)], hashes, block_size=16) == "four"


def test_pick_prefill_match_stops_at_first_missing_block():
    # Holding block 1's key without block 0's cannot help: the chain starts at block 0.
    assert pick_prefill([_p("x", 40, frozenset({"h1", "h2"})), _p("y", 30)], ["h0", "h1", "h2"]) == "y"


def _d(wid: str, running: int, free: int, **kw) -> WorkerLoad:
    return WorkerLoad(wid, "decode", running_seqs=running, free_blocks=free, total_blocks=100, **kw)


def test_pick_decode_balances_batches_then_free_blocks():
    assert pick_decode([_d("a", 3, 90), _d("b", 1, 20), _d("c", 2, 99)], 10) == "b"
    assert pick_decode([_d("a", 1, 30), _d("b", 1, 60)], 10) == "b"
    assert pick_decode([_d("a", 1, 30), WorkerLoad("p", "prefill", free_blocks=100, total_blocks=100)], 10) == "a"


def test_pick_decode_skips_unhealthy_full_and_capped_workers():
    workers = [_d("sick", 0, 100, healthy=False), _d("full", 0, 5), _d("capped", 4, 100, max_running_seqs=4),
               _d("ok", 9, 12)]
    assert pick_decode(workers, 10) == "ok"
    assert pick_decode(workers, 13) is None
    # Keeping 10% of 100 blocks in reserve: 12 free - 10 needed = 2 < 10.
    assert pick_decode(workers, 10, reserve_fraction=0.1) is None
    assert pick_decode([], 1) is None


def test_prefix_index_remembers_recent_hashes_per_worker():
    idx = PrefixIndex(capacity_per_worker=3)
    idx.record("w1", ["a", "b", "c"])
    idx.record("w1", ["a"])  # refreshed: now the most recent
    idx.record("w1", ["d"])  # evicts the least recent, "b"
    assert set(idx.view("w1")) == {"a", "c", "d"}
    assert "a" in idx.view("w1") and "x" not in idx.view("w2")
    load = WorkerLoad("w1", "prefill", outstanding_prefill_tokens=100, cached_prefixes=idx.view("w1"))
    assert pick_prefill([load, _p("w2", 90)], ["a"], block_size=16) == "w1"
    idx.forget("w1")
    assert len(idx.view("w1")) == 0


def test_longest_choices_is_the_most_that_n_choices_fit():
    for prompt_len in (1, 15, 16, 40, 300):
        for n in (2, 3, 7):
            for pool in (64, 128, 1000):
                m = longest_choices(prompt_len, n, pool, 16)
                if m >= 1:
                    assert choices_blocks_needed(prompt_len, m, n, 16) <= pool
                # one token more each would not fit (nor would any, when m < 1)
                assert choices_blocks_needed(prompt_len, max(m, 0) + 1, n, 16) > pool


def test_a_request_without_max_tokens_runs_as_far_as_a_decode_worker_holds():
    from types import SimpleNamespace

    from pdcluster.cluster.serve.app import Ingress

    def ingress(prefill_blocks: int, decode_blocks: list[int]) -> SimpleNamespace:
        workers = {"p": SimpleNamespace(role="prefill", num_total_blocks=prefill_blocks),
                   **{f"d{i}": SimpleNamespace(role="decode", num_total_blocks=b)
                      for i, b in enumerate(decode_blocks)}}
        fake = SimpleNamespace(info=SimpleNamespace(block_size=16, workers=workers))
        fake._decode_pool_blocks = lambda: sum(decode_blocks)
        return fake

    default = Ingress.func_or_class._default_max_tokens
    # the context's end (room) when the smallest decode worker holds it; the prefill worker's
    # cache never holds the answer
    assert default(ingress(8, [1000, 1000]), 100, 8092, 1) == 8092
    # else what the smallest decode worker holds: prompt and answer fill its cache exactly
    assert default(ingress(1000, [128, 512]), 100, 8092, 1) == 128 * 16 - 100
    # n choices: each to the longest that all n fit the decode pool at once, within that too
    assert default(ingress(8, [512, 512]), 100, 8092, 4) == longest_choices(100, 4, 1024, 16)
    assert default(ingress(8, [128, 4096]), 100, 8092, 2) == 128 * 16 - 100
    # a prompt no decode worker holds: left to the worker's refusal
    assert default(ingress(8, [4]), 100, 8092, 1) == 8092
