"""Continuous batching decisions without a model: token budget, chunking, admission, preemption."""
from __future__ import annotations

from pdcluster.engine.block_manager import BlockManager
from pdcluster.engine.sampling import SamplingParams
from pdcluster.engine.scheduler import Scheduler
from pdcluster.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_seqs=8, budget=16):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    return bm, Scheduler(bm, max_seqs, budget)


def apply(out):
    """What the engine does after running a step: mark KV computed, 'sample' a token."""
    for s in out.scheduled:
        done = s.completes
        s.seq.num_computed_tokens += s.num_tokens
        if done:
            s.seq.token_ids.append(7)


def test_chunked_prefill_respects_budget_and_decodes_join():
    bm, sch = make(budget=16)
    long = Sequence("long", list(range(40)), SamplingParams())
    sch.add(long)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("long", 16)]
    apply(out)
    short = Sequence("short", [1, 2, 3], SamplingParams())
    sch.add(short)
    out = sch.schedule()         # the running chunk takes half while a prompt waits: it starts now
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("long", 8), ("short", 3)]
    assert [s.completes for s in out.scheduled] == [False, True]
    apply(out)
    out = sch.schedule()                               # nobody waits: the chunk takes the budget
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("long", 16)]
    assert all(s.completes for s in out.scheduled)
    apply(out)
    out = sch.schedule()                               # both decode now: one token each
    assert [s.num_tokens for s in out.scheduled] == [1, 1]
    assert out.num_tokens <= 16


def test_running_prompt_chunks_take_half_the_budget_while_a_short_prompt_waits():
    bm, sch = make(num_blocks=256, budget=16)
    long = Sequence("long", list(range(100)), SamplingParams())
    sch.add(long)
    apply(sch.schedule())
    for i in range(3):                                 # 3 x 5 prompt tokens want more than half
        sch.add(Sequence(f"w{i}", list(range(5)), SamplingParams()))
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [
        ("long", 8), ("w0", 5), ("w1", 3)]
    # a handoff's KV is loaded, not computed: it takes nothing from the running chunk
    bm2, sch2 = make(num_blocks=256, budget=16)
    sch2.add(Sequence("long", list(range(100)), SamplingParams()))
    apply(sch2.schedule())
    handoff = Sequence("h", list(range(40)), SamplingParams())
    handoff.kv_import = object()
    sch2.add(handoff)
    assert [(s.seq.request_id, s.num_tokens) for s in sch2.schedule().scheduled] == [("long", 16)]


def test_max_num_seqs_caps_the_running_batch():
    bm, sch = make(max_seqs=2, budget=64)
    for i in range(4):
        sch.add(Sequence(f"s{i}", [1, 2], SamplingParams()))
    out = sch.schedule()
    assert len(out.scheduled) == 2 and len(sch.waiting) == 2


def test_preemption_frees_blocks_and_requeues_newest():
    bm, sch = make(num_blocks=4, block_size=4, budget=64)
    a = Sequence("a", list(range(7)), SamplingParams())
    b = Sequence("b", list(range(7)), SamplingParams())
    sch.add(a), sch.add(b)
    apply(sch.schedule())                              # 2 blocks each: the pool is full
    assert bm.num_free_blocks == 0
    a.token_ids.append(1)                              # a crosses into a third block next step
    out = sch.schedule()
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [s.seq for s in out.scheduled] == [a]
    assert sch.waiting[0] is b
    sch.finish(a, "stop")
    sch.finish(b, "abort")
    assert bm.num_free_blocks == 4 and not sch.has_unfinished()


def test_decode_batch_counts_decodes_only_when_no_prompt_is_computed():
    bm, sch = make(budget=16)
    a = Sequence("a", list(range(6)), SamplingParams())
    sch.add(a)
    assert sch.decode_batch() == 0                     # a newcomer's prompt comes next
    apply(sch.schedule())
    assert sch.decode_batch() == 1                     # a decodes
    loaded = Sequence("loaded", [1, 2, 3], SamplingParams())
    loaded.kv_import = object()                        # its KV is handed over: loaded, not computed
    sch.add(loaded)
    assert sch.decode_batch() == 1
    b = Sequence("b", list(range(30)), SamplingParams())
    sch.add(b)
    assert sch.decode_batch() == 0
    sch.waiting.remove(loaded)
    apply(sch.schedule())                              # b's first chunk: 15 of its 30 tokens
    assert b.num_computed_tokens < b.num_tokens - 1 and sch.decode_batch() == 0


def test_a_long_newcomer_waits_its_turn():
    """Only a prompt that fits in the share takes it: long newcomers started at once would each get
    one chunk and then stall, all part-computed, holding blocks."""
    bm, sch = make(num_blocks=256, budget=16)
    sch.add(Sequence("first", list(range(100)), SamplingParams()))
    apply(sch.schedule())
    sch.add(Sequence("second", list(range(100, 140)), SamplingParams()))
    assert [(s.seq.request_id, s.num_tokens) for s in sch.schedule().scheduled] == [("first", 16)]


def test_a_prompt_waits_for_blocks_a_running_prompt_is_computing():
    """A short prompt that begins with the block a running prompt is computing waits a step and
    finds it in the prefix cache; one sharing only blocks already computed starts at once."""
    bm = BlockManager(256, 4, enable_prefix_caching=True)
    sch = Scheduler(bm, 8, 16)

    def step():
        out = sch.schedule()
        apply(out)
        for s in out.scheduled:
            bm.commit(s.seq)
        return [(s.seq.request_id, s.num_tokens) for s in out.scheduled]

    sch.add(Sequence("a", list(range(200, 213)), SamplingParams()))
    sch.add(Sequence("long", list(range(100)), SamplingParams()))
    assert step() == [("a", 13), ("long", 3)]     # "long" is computing its first block
    same = Sequence("same", list(range(6)), SamplingParams())
    sch.add(same)
    assert step() == [("a", 1), ("long", 15)]     # "same" begins with that block: it waits
    assert step() == [("a", 1), ("long", 8), ("same", 2)]
    assert same.num_cached_tokens == 4            # the block came from the cache
