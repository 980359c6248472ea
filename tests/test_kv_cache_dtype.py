"""A KV cache of another element type than the model's (`kv_cache_dtype`): a float16 or bfloat16
cache holds twice the blocks in the same memory, decodes close to the float32 cache on MHA and MLA
models, hands its KV off between two engines of the same cache type, and an engine whose cache is of
another type recomputes such a handoff instead of reading it."""
from __future__ import annotations

import model_factory as mf
import pytest
import torch
from pdcluster.engine import LLM, SamplingParams
from pdcluster.engine.config import EngineConfig
from pdcluster.engine.llm_engine import LLMEngine
from test_kv_async_transfer import Store, assert_all_blocks_free, decode, prefill

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
# a float16 entry keeps 11 significant bits, bfloat16 8: the logprobs of the chosen tokens move by
# about that much relative to the float32 cache (seen: ~1e-4 and ~1e-3), far less than a wrong KV would
LOGPROB_TOL = {"float16": 2e-3, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvdtype")
    return {"llama": str(mf.save_model(mf.llama_config(), root / "llama", seed=11)),
            "deepseek": str(mf.save_model(mf.deepseek_config(), root / "deepseek", seed=12))}


def _generate(path: str, kv_cache_dtype: str):
    llm = LLM(path, kv_cache_dtype=kv_cache_dtype, **mf.ENGINE_KWARGS)
    return llm, llm.generate(mf.prompts(), GREEDY)


@pytest.mark.parametrize("model", ["llama", "deepseek"])      # MHA (the C kernel), MLA (torch path)
@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_a_half_width_cache_decodes_close_to_the_float32_one(checkpoints, model, kv_cache_dtype):
    ref_llm, want = _generate(checkpoints[model], "auto")
    llm, got = _generate(checkpoints[model], kv_cache_dtype)
    assert ref_llm.engine.kv_cache.dtype == torch.float32
    assert llm.engine.kv_cache.dtype == getattr(torch, kv_cache_dtype)
    assert llm.engine.kv_layout.dtype == kv_cache_dtype
    assert llm.engine.fingerprint != ref_llm.engine.fingerprint   # its blocks are not float32 blocks
    # greedy: each token is the argmax of its logits, so compare the logprobs of the float32 run's
    # tokens up to the first step where the two runs chose differently (near-ties may flip)
    compared = 0
    for a, b in zip(want, got):
        for tok_a, tok_b, lp_a, lp_b in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            assert abs(lp_a.logprob - lp_b.logprob) < LOGPROB_TOL[kv_cache_dtype]
            compared += 1
            if tok_a != tok_b:
                break
    assert compared >= len(want) * 4


def test_a_half_width_cache_holds_twice_the_blocks_in_the_same_memory():
    full = LLMEngine(EngineConfig(device="cpu", kv_cache_gib=0.05))
    half = LLMEngine(EngineConfig(device="cpu", kv_cache_gib=0.05, kv_cache_dtype="float16"))
    assert half.block_nbytes * 2 == full.block_nbytes
    assert half.kv_cache.shape[0] // 2 == full.kv_cache.shape[0]    # the same bytes, floored
    with pytest.raises(ValueError, match="dtype"):
        LLMEngine(EngineConfig(device="cpu", num_kv_blocks=8, kv_cache_dtype="float8"))


def test_a_float16_handoff_lands_in_a_float16_cache_and_another_cache_recomputes_it(checkpoints):
    path = checkpoints["llama"]
    prompts = mf.prompts(seed=1)[:3]
    store = Store()
    sender = LLM(path, kv_cache_dtype="float16", **mf.ENGINE_KWARGS).engine
    same = LLM(path, kv_cache_dtype="float16", **mf.ENGINE_KWARGS).engine
    other = LLM(path, **mf.ENGINE_KWARGS).engine            # a float32 cache
    for eng in (sender, same, other):
        store.attach(eng)
    handoffs = prefill(sender, prompts, "f16")
    assert all(h.layout.dtype == "float16" for h in handoffs)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)  # prefill()'s params
    for eng, want_loaded in ((same, True), (other, False)):
        got = decode(eng, handoffs)
        stats = eng.stats()
        if want_loaded:     # every prompt block read from the store, none recomputed
            assert stats.kv_blocks_loaded == sum(len(h.blocks) for h in handoffs)
            assert stats.kv_recomputed_tokens == 0
        else:               # the float16 blocks never entered the float32 cache
            assert stats.kv_blocks_loaded == 0 and stats.kv_recomputed_tokens > 0
        # each decodes exactly as a colocated engine with its own cache type does
        colocated = LLM(path, kv_cache_dtype=str(eng.kv_cache.dtype).removeprefix("torch."),
                        **mf.ENGINE_KWARGS).generate(prompts, greedy)
        assert [got[h.request_id][0] for h in handoffs] == [c.token_ids for c in colocated]
        assert_all_blocks_free(eng)
    assert_all_blocks_free(sender)
