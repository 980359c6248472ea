"""Engine behaviour on the embedded model: prefix reuse, preemption, sampling controls, stop, abort."""
from __future__ import annotations

import pytest

from pdcluster.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SHARED = ("You are a meticulous assistant. Answer in one sentence, cite no sources, and never "
          "apologise. The user is a student preparing for an exam on European geography. ") * 3


def test_prefix_reuse_skips_shared_blocks_and_keeps_output(llm):
    eng = llm.engine
    first = llm.tokenizer.encode(SHARED + "What is the capital of Spain?")
    second = llm.tokenizer.encode(SHARED + "What is the longest river in France?")
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    bs = eng.config.block_size
    assert common >= 4 * bs
    llm.generate([first], GREEDY)
    before = eng.stats().computed_tokens_total
    out = llm.generate([second], GREEDY)[0]
    computed = eng.stats().computed_tokens_total - before
    cached = (common // bs) * bs
    assert out.num_cached_tokens == cached
    # the prompt minus the cached blocks, then one token per generated token but the last
    assert computed == len(second) - cached + GREEDY.max_tokens - 1
    fresh = LLM(num_kv_blocks=64, enable_prefix_caching=False).generate([second], GREEDY)[0]
    assert out.token_ids == fresh.token_ids


def test_concurrent_sequences_share_prefix_blocks(llm):
    eng = llm.engine
    a = llm.tokenizer.encode(SHARED + "Name a river.")
    b = llm.tokenizer.encode(SHARED + "Name a mountain.")
    llm.generate([a], SamplingParams(temperature=0, max_tokens=1))     # warm the prefix cache
    eng.add_request("share-a", prompt_token_ids=a, params=GREEDY)
    eng.add_request("share-b", prompt_token_ids=b, params=GREEDY)
    eng.step()
    ta, tb = (eng._seqs[r].block_table for r in ("share-a", "share-b"))
    assert ta[:4] == tb[:4]
    assert all(eng.block_manager.ref_counts[x] == 2 for x in ta[:4])
    eng.abort_request("share-a"), eng.abort_request("share-b")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


@pytest.fixture(scope="module")
def tiny_pool():
    # 10 blocks x 16 tokens = 160 token slots for 4 sequences that each need ~70: must preempt
    return LLM(num_kv_blocks=10, max_num_batched_tokens=64, enable_prefix_caching=False)


def test_short_prompt_starts_before_a_long_prompt_is_prefilled():
    """A short request arriving during a long prompt's chunked prefill gets its first token on the
    next step, not after the long prompt's every chunk; both answers are the ones each gets alone."""
    llm = LLM(num_kv_blocks=128, enable_prefix_caching=False, max_num_batched_tokens=96)
    eng = llm.engine
    budget = eng.config.max_num_batched_tokens
    long = llm.tokenizer.encode(SHARED * 5 + "Summarise the above.")
    short = llm.tokenizer.encode("Name a colour.")
    assert len(long) > 4 * budget and len(short) < budget // 2
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in (long, short)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.add_request("hol-long", prompt_token_ids=long, params=GREEDY)
    eng.step()
    eng.add_request("hol-short", prompt_token_ids=short, params=one)
    first = [o.request_id for o in eng.step() if o.new_token_ids]
    assert first == ["hol-short"]
    assert eng._seqs["hol-long"].num_computed_tokens < len(long)  # still prefilling
    eng.abort_request("hol-long")
    while eng.has_unfinished_requests():
        eng.step()
    assert llm.generate([short], one)[0].token_ids == alone[1][:1]
    outs = {}
    eng.add_request("hol-long", prompt_token_ids=long, params=GREEDY)
    eng.step()
    eng.add_request("hol-short", prompt_token_ids=short, params=GREEDY)
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [outs["hol-long"], outs["hol-short"]] == alone


def test_preemption_under_tiny_pool_gives_same_output(llm, tiny_pool):
    prompts = [llm.tokenizer.encode(f"Story number {i}: a dragon, a knight and a {w} met. Then")
               for i, w in enumerate(["wizard", "baker", "sailor", "poet"])]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = llm.generate(prompts, params)
    got = tiny_pool.generate(prompts, params)
    stats = tiny_pool.engine.stats()
    assert stats.preemptions_total > 0
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert stats.num_free_blocks == stats.num_total_blocks


def test_request_larger_than_the_pool_is_rejected_not_stuck(tiny_pool):
    with pytest.raises(ValueError, match="KV cache"):
        tiny_pool.engine.add_request("huge", prompt_token_ids=[5] * 150,
                                     params=SamplingParams(max_tokens=100))


def test_a_prefill_engine_needs_room_for_the_prompt_and_first_token_only(tiny_pool):
    # a prefill engine (kv_export) never holds the answer: its cache bounds the prompt, not max_tokens
    params = SamplingParams(max_tokens=1000)
    tiny_pool.engine.validate_prompt([5] * 150, params, kv_export=True)
    with pytest.raises(ValueError, match="KV cache"):
        tiny_pool.engine.validate_prompt([5] * 150, params)
    with pytest.raises(ValueError, match="KV cache"):
        tiny_pool.engine.validate_prompt([5] * 160, params, kv_export=True)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(llm):
    prompt = llm.tokenizer.encode("My favourite animal is")
    p = lambda seed: SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=12,  # noqa: E731
                                    ignore_eos=True)
    a, b, c = llm.generate([prompt, prompt, prompt], [p(1), p(1), p(2)])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # every bit of a 64-bit seed counts (a CPU generator keeps 32), and any of the API's range runs
    high = llm.generate([prompt] * 4, [p(1 + 2**32), p(1 + 2**63), p(-1), p(2**64 - 1)])
    assert all(h.token_ids != a.token_ids for h in high[:2]) and high[0].token_ids != high[1].token_ids
    assert high[2].token_ids == high[3].token_ids   # -1 and 2**64 - 1 are one seed modulo 2**64
    assert llm.generate([prompt], [p(2**64)])[0].token_ids == llm.generate([prompt], [p(0)])[0].token_ids


def test_top_k_one_is_greedy(llm):
    prompt = llm.tokenizer.encode("The three primary colours are")
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0]
    topk1 = llm.generate([prompt], SamplingParams(temperature=0.8, top_k=1, max_tokens=10, seed=3))[0]
    assert greedy.token_ids == topk1.token_ids


def test_stop_string_cuts_text_and_stop_token_ends(llm):
    prompt = llm.tokenizer.encode("1, 2, 3, 4, 5,")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert " 7" in free.text
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[" 7"],
                                                ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(" 7")]
    tok = free.token_ids[2]
    by_id = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  stop_token_ids=[tok]))[0]
    assert by_id.token_ids == free.token_ids[:3] and by_id.finish_reason == "stop"
    length = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 3


def test_streamed_deltas_concatenate_to_the_text(llm):
    eng = llm.engine
    eng.add_request("stream", prompt_token_ids=llm.chat_prompt(
        [{"role": "user", "content": "Say hello in French and German."}]),
        params=SamplingParams(temperature=0, max_tokens=30))
    pieces, tokens = [], []
    while eng.has_unfinished_requests():
        for out in eng.step():
            pieces.append(out.delta_text)
            tokens += out.new_token_ids
    assert "".join(pieces) == llm.tokenizer.decode(tokens)


def test_abort_returns_every_block(llm):
    eng = llm.engine
    for i in range(3):
        eng.add_request(f"ab{i}", prompt_token_ids=list(range(100, 160)), params=GREEDY)
    eng.step()
    assert eng.stats().num_free_blocks < eng.stats().num_total_blocks
    assert all(eng.abort_request(f"ab{i}") for i in range(3))
    assert not eng.abort_request("ab0")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [10**7]}, "token ids"),
    ({"prompt_token_ids": [1] * 9000}, "context"),
    ({"prompt_token_ids": [1, 2], "params": SamplingParams(max_tokens=9000)}, "exceeds"),
])
def test_bad_requests_raise_value_error(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request("bad", **kwargs)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
    {"logprobs": 99}, {"stop": [""]}, {"seed": "x"},
])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_resume_after_generated_tokens_continues_the_same_stream(llm):
    """A request resumed from the tokens a client already has (a decode worker died) goes on
    exactly as the uninterrupted one does, and does not repeat those tokens."""
    prompt = llm.chat_prompt([{"role": "user", "content": "Name three colours of the rainbow."}])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate([prompt], params)[0]
    eng = llm.engine
    eng.add_request("resumed", prompt_token_ids=prompt, params=params,
                    generated_token_ids=full.token_ids[:7])
    rest, text = [], ""
    while eng.has_unfinished_requests():
        for out in eng.step():
            rest += out.new_token_ids
            text += out.delta_text
    assert full.token_ids[:7] + rest == full.token_ids
    assert llm.tokenizer.decode(full.token_ids[:7]) + text == full.text
