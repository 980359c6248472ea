"""KV transfers off the step thread, on a tiny model: the same greedy tokens as the synchronous path,
a slow load or save never holds up the running batch, an abort mid-transfer gives every block back,
and a corrupt block is recomputed."""
from __future__ import annotations

import threading
import time

import model_factory as mf
import pytest
import torch
from pdcluster.engine import LLM, SamplingParams
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.kv_handoff import KVHandoff
from pdcluster.engine.llm_engine import LLMEngine

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
GATE_TIMEOUT_S = 30.0   # a gate the test forgot to open fails the transfer instead of hanging


class Store:
    """An in-process KV store engines share. While a gate is closed, the transfer thread waits at it
    (loads at `load_gate`, saves at `save_gate`); `*_started` records when one got there."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}
        self.commits: dict[str, int] = {}
        self.load_gate, self.save_gate = threading.Event(), threading.Event()
        self.load_gate.set()
        self.save_gate.set()
        self.load_started: float | None = None
        self.save_started: float | None = None

    def attach(self, engine: LLMEngine) -> None:
        engine.set_kv_connector(_Connector(self, engine.kv_cache))

    def open(self) -> None:
        self.load_gate.set()
        self.save_gate.set()


class _Connector(KVConnector):
    def __init__(self, store: Store, cache: torch.Tensor) -> None:
        self.store, self.cache = store, cache

    def save(self, keys, block_ids, checksums):
        s = self.store
        s.save_started = time.perf_counter()
        if not s.save_gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("save gate never opened")
        for key, b, crc in zip(keys, block_ids, checksums):
            if key not in s.blocks:
                s.blocks[key] = self.cache[b].clone()
                if crc is not None:
                    s.commits[key] = crc
        return [True] * len(keys)

    def load(self, keys, block_ids):
        s = self.store
        s.load_started = time.perf_counter()
        if not s.load_gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("load gate never opened")
        for key, b in zip(keys, block_ids):
            if key in s.blocks:
                self.cache[b].copy_(s.blocks[key])
        return [key in s.blocks for key in keys]

    def commit(self, keys, checksums):
        for key, crc in zip(keys, checksums):
            self.store.commits.setdefault(key, crc)

    def committed(self, keys):
        return [self.store.commits.get(k) if k in self.store.blocks else None for k in keys]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # initializer_range 0.2: greedy tokens vary with the context, so wrong KV shows in the output
    return str(mf.save_model(mf.llama_config(initializer_range=0.2),
                             tmp_path_factory.mktemp("llama"), seed=3))


@pytest.fixture
def store():
    s = Store()
    yield s
    s.open()  # never leave a transfer thread waiting


def engine(checkpoint: str, store: Store | None, async_kv: bool = True) -> LLMEngine:
    eng = LLM(checkpoint, async_kv_transfer=async_kv, **mf.ENGINE_KWARGS).engine
    if store is not None:
        store.attach(eng)
    return eng


def prefill(eng: LLMEngine, prompts: list[list[int]], tag: str) -> list[KVHandoff]:
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", prompt_token_ids=p, params=GREEDY, kv_export=True)
    handoffs = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.finish_reason == "handoff" and out.new_token_ids == [out.kv_handoff.first_token]
            handoffs[out.request_id] = out.kv_handoff
    return [handoffs[f"{tag}-{i}"] for i in range(len(prompts))]


def import_request(eng: LLMEngine, h: KVHandoff) -> None:
    eng.add_request(h.request_id, prompt_token_ids=list(h.token_ids), params=GREEDY, kv_import=h)


def decode(eng: LLMEngine, handoffs: list[KVHandoff]) -> dict[str, tuple[list[int], str]]:
    """Continue the handed-off requests to the end: each one's tokens (first token included) and the
    text decode streamed."""
    got = {}
    for h in handoffs:
        import_request(eng, h)
        got[h.request_id] = ([h.first_token], "")
    run(eng, got)
    return got


def run(eng: LLMEngine, got: dict[str, tuple[list[int], str]], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return
        for out in eng.step():
            tokens, text = got.setdefault(out.request_id, ([], ""))
            got[out.request_id] = (tokens + out.new_token_ids, text + out.delta_text)
    raise AssertionError("the engine did not finish")


def assert_all_blocks_free(eng: LLMEngine) -> None:
    s = eng.stats()
    assert s.num_running == s.num_waiting == s.num_loading_kv == 0
    assert s.num_free_blocks == s.num_total_blocks


def test_async_and_sync_transfers_give_the_same_tokens(checkpoint):
    prompts = mf.prompts(seed=1)[:4]                  # 5, 19, 40 and 77 tokens, no shared prefix
    results = {}
    for async_kv in (True, False):
        store = Store()
        prefill_eng, decode_eng = engine(checkpoint, store, async_kv), engine(checkpoint, store, async_kv)
        handoffs = prefill(prefill_eng, prompts, f"same-{async_kv}")
        got = decode(decode_eng, handoffs)
        stats = decode_eng.stats()
        # every prompt block came from the store; decode computed only its own tokens' KV
        assert stats.kv_blocks_loaded == sum(len(h.blocks) for h in handoffs) == 1 + 2 + 3 + 5
        assert stats.kv_recomputed_tokens == 0
        assert stats.computed_tokens_total == len(prompts) * (MAX_TOKENS - 1)
        # the async engine really went through its transfer thread (the sync one never does)
        assert stats.kv_wait_seconds["cumulative"][-1] == (len(prompts) if async_kv else 0)
        assert_all_blocks_free(prefill_eng)
        assert_all_blocks_free(decode_eng)
        results[async_kv] = [got[h.request_id] for h in handoffs]
    assert results[True] == results[False]
    colocated = LLM(checkpoint, **mf.ENGINE_KWARGS).generate(prompts, GREEDY)
    assert [tokens for tokens, _ in results[True]] == [c.token_ids for c in colocated]
    assert len({tuple(tokens) for tokens, _ in results[True]}) == len(prompts)


def test_a_slow_load_does_not_hold_up_the_running_batch(checkpoint, store):
    prefill_eng, dec = engine(checkpoint, store), engine(checkpoint, store)
    prompts = mf.prompts(seed=2)
    (handoff,) = prefill(prefill_eng, [prompts[3]], "slow")
    reference = decode(engine(checkpoint, store, async_kv=False), [handoff])[handoff.request_id]
    # a request already decoding
    dec.add_request("runner", prompt_token_ids=prompts[1], params=LONG)
    while not any(o.new_token_ids for o in dec.step()):
        pass
    steps_before = dec.stats().step_seconds["cumulative"][-1]
    store.load_gate.clear()
    import_request(dec, handoff)
    for _ in range(8):
        outs = dec.step()
        # the runner gets its token every step while the newcomer's KV is on its way
        assert [(o.request_id, len(o.new_token_ids)) for o in outs] == [("runner", 1)]
        assert [s.request_id for s in dec.scheduler.loading] == [handoff.request_id]
    assert store.load_started is not None             # the load is at the gate, not queued behind
    stats = dec.stats()
    assert stats.num_loading_kv == 1 and stats.num_running == 1
    assert stats.step_seconds["cumulative"][-1] - steps_before == 8
    assert stats.kv_wait_seconds["cumulative"][-1] == 0
    opened = time.perf_counter()
    store.load_gate.set()
    got = {handoff.request_id: ([handoff.first_token], "")}
    run(dec, got)
    assert got[handoff.request_id] == reference
    assert len(got["runner"][0]) == LONG.max_tokens - 1 - 8  # the rest of the runner's tokens
    wait = dec.stats().kv_wait_seconds
    assert wait["cumulative"][-1] == 1
    assert wait["sum"] >= opened - store.load_started  # admission to arrival, gate time included
    assert dec.stats().kv_recomputed_tokens == 0
    assert_all_blocks_free(dec)


def test_abort_during_a_load_frees_every_block_and_emits_nothing(checkpoint, store):
    prefill_eng, dec = engine(checkpoint, store), engine(checkpoint, store)
    (handoff,) = prefill(prefill_eng, [mf.prompts(seed=3)[3]], "abort")
    free = dec.stats().num_free_blocks
    store.load_gate.clear()
    import_request(dec, handoff)
    assert dec.step() == []
    assert [s.request_id for s in dec.scheduler.loading] == [handoff.request_id]
    assert dec.stats().num_free_blocks < free
    assert dec.abort_request(handoff.request_id)
    for _ in range(3):
        # the transfer thread still writes into its blocks: they are not handed out again yet
        assert dec.step() == []
        assert dec.stats().num_free_blocks < free
    store.load_gate.set()
    got: dict = {}
    run(dec, got)
    assert got == {}
    assert dec.stats().num_free_blocks == free
    assert_all_blocks_free(dec)
    assert not dec.abort_request(handoff.request_id)
    # the engine goes on: the same request decodes as if nothing had happened
    again = decode(dec, [handoff])[handoff.request_id]
    assert again == decode(engine(checkpoint, store, async_kv=False), [handoff])[handoff.request_id]
    assert_all_blocks_free(dec)


def test_a_corrupt_block_on_an_async_load_is_recomputed(checkpoint, store):
    prefill_eng, dec = engine(checkpoint, store), engine(checkpoint, store)
    prompt = mf.prompts(seed=4)[3]                    # 77 tokens: 4 full blocks and a partial one
    (handoff,) = prefill(prefill_eng, [prompt], "corrupt")
    victim = handoff.blocks[1].key
    store.blocks[victim] = torch.randn_like(store.blocks[victim])
    before = dec.stats()
    got = decode(dec, [handoff])[handoff.request_id]
    after = dec.stats()
    assert after.kv_wait_seconds["cumulative"][-1] - before.kv_wait_seconds["cumulative"][-1] == 1
    assert after.kv_corrupt_blocks - before.kv_corrupt_blocks == 1
    assert after.kv_blocks_loaded - before.kv_blocks_loaded == 1      # the block before it
    assert after.kv_recomputed_tokens - before.kv_recomputed_tokens == len(prompt) - 16
    assert (after.computed_tokens_total - before.computed_tokens_total
            == len(prompt) - 16 + MAX_TOKENS - 1)
    colocated = LLM(checkpoint, **mf.ENGINE_KWARGS).generate([prompt], GREEDY)[0]
    assert got[0] == colocated.token_ids
    assert_all_blocks_free(dec)


def test_prefill_returns_the_first_token_only_once_its_blocks_are_stored(checkpoint, store):
    eng = engine(checkpoint, store)
    prompts = mf.prompts(seed=5)
    (reference,) = prefill(engine(checkpoint, Store(), async_kv=False), [prompts[2]], "ref")
    eng.add_request("other", prompt_token_ids=prompts[0], params=LONG)
    store.save_gate.clear()
    eng.add_request("export", prompt_token_ids=prompts[2], params=GREEDY, kv_export=True)
    outs = []
    for _ in range(10):                               # 40 prompt tokens: two chunks, then it saves
        outs += eng.step()
        if eng.scheduler.saving:
            break
    assert [s.request_id for s in eng.scheduler.saving] == ["export"]
    for _ in range(5):
        step = eng.step()
        # the other request keeps stepping; the export's first token waits for its blocks
        assert [(o.request_id, len(o.new_token_ids)) for o in step] == [("other", 1)]
        outs += step
    deadline = time.monotonic() + GATE_TIMEOUT_S   # the transfer thread may not have run yet
    while store.save_started is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.save_started is not None and store.blocks == {}   # held at the gate, nothing stored
    assert all(o.request_id == "other" for o in outs)
    store.save_gate.set()
    deadline, done = time.monotonic() + GATE_TIMEOUT_S, []
    while not done and time.monotonic() < deadline:   # steps until the transfer thread has stored it
        done = [o for o in eng.step() if o.request_id == "export"]
    (out,) = done
    assert out.finished and out.finish_reason == "handoff"
    assert out.new_token_ids == [reference.first_token] == [out.kv_handoff.first_token]
    assert len(out.kv_handoff.blocks) == 3
    assert all(ref.key in store.blocks for ref in out.kv_handoff.blocks)  # stored before it left
    assert eng.scheduler.saving == []
    run(eng, {})
    assert_all_blocks_free(eng)


def test_a_first_token_whose_blocks_store_quickly_leaves_with_its_step(checkpoint, store, monkeypatch):
    """The step that samples an exported prompt's first token waits a little for its blocks (a
    share of the step, capped): stored in time, the handoff leaves with that step, not after the
    next one, which behind a long prompt's chunks can take seconds."""
    from pdcluster.engine import llm_engine

    monkeypatch.setattr(llm_engine, "SAVE_GRACE_SHARE", 1e6)  # a tiny model's step is too short
    eng = engine(checkpoint, store)
    prompts = mf.prompts(seed=6)
    eng.add_request("other", prompt_token_ids=prompts[0], params=LONG)
    eng.add_request("export", prompt_token_ids=prompts[2], params=GREEDY, kv_export=True)
    for _ in range(20):
        outs = [o for o in eng.step() if o.request_id == "export"]
        assert eng.scheduler.saving == []       # never left for a later step to pick up
        if outs:
            break
    (out,) = outs
    assert out.finish_reason == "handoff" and all(ref.key in store.blocks for ref in out.kv_handoff.blocks)
    # a save the store holds back still does not hold up the step for longer than the cap
    store.save_gate.clear()
    eng.add_request("held", prompt_token_ids=prompts[1], params=GREEDY, kv_export=True)
    while not eng.scheduler.saving:
        eng.step()
    started = time.perf_counter()
    eng.step()
    assert time.perf_counter() - started < 10 * llm_engine.SAVE_GRACE_MAX_S
    store.save_gate.set()
    run(eng, {})
    assert_all_blocks_free(eng)
