"""Speculative decoding on the embedded model: greedy output is token-identical to plain decoding
in a mixed batch, under chunked prefill, preemption, prefix-cache hits, stop strings, max_tokens and
logprobs, and every KV block comes back however many drafts were rejected."""
from __future__ import annotations

import pytest

from pdcluster.engine import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
        "brass lantern, a flask of tea and a notebook in which he recorded the ships that passed.")


def copy_prompt(llm: LLM, text: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": f"Repeat this text exactly:\n\n{text}"}])


def prompts(llm: LLM) -> list[list[int]]:
    """8 prompts of different lengths: copy-heavy (one long enough to be prefilled in chunks of 96
    tokens) and free-form."""
    def chat(msg: str) -> list[int]:
        return llm.chat_prompt([{"role": "user", "content": msg}])

    return [
        copy_prompt(llm, TEXT),
        copy_prompt(llm, TEXT + " " + TEXT.replace("lighthouse", "harbour")),
        copy_prompt(llm, "Roses are red, violets are blue, sugar is sweet, and so are you."),
        chat("Rewrite this list in reverse order: apple, banana, cherry, date, elderberry, fig."),
        chat("Write a short poem about autumn."),
        chat("What is the capital of France?"),
        llm.tokenizer.encode("Once upon a time"),
        llm.tokenizer.encode("def fibonacci(n):\n    "),
    ]


@pytest.fixture(scope="module")
def spec_llm():
    # the same engine shape as conftest's `llm`, plus speculation
    return LLM(num_kv_blocks=512, max_num_batched_tokens=96, max_num_seqs=16,
               speculative_config=NGRAM)


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_greedy_batch_is_token_identical(llm, spec_llm):
    ps = prompts(llm)
    assert max(len(p) for p in ps) > 96           # one prompt is prefilled in chunks
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    before = spec_llm.engine.stats()
    expected = llm.generate(ps, params)
    got = spec_llm.generate(ps, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected]
    assert all(len(g.token_ids) == 32 and g.finish_reason == "length" for g in got)
    stats = spec_llm.engine.stats()
    drafted = stats.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    assert drafted > 0 and accepted > drafted / 3  # the copies are mostly drafted right
    # committed KV is what plain decoding computes: prompts (less prefix-cache hits, the chat
    # prompts share their start) plus every token but the last
    hits = stats.prefix_hit_tokens_total - before.prefix_hit_tokens_total
    assert (stats.computed_tokens_total - before.computed_tokens_total
            == sum(len(p) for p in ps) - hits + 8 * 31)
    assert_all_blocks_free(spec_llm)


def test_preemption_with_a_tiny_pool_is_token_identical(llm):
    # 10 blocks of 16 tokens for 3 sequences that each end at ~90 tokens: must preempt
    tiny = LLM(num_kv_blocks=10, max_num_batched_tokens=64, enable_prefix_caching=False,
               speculative_config=NGRAM)
    ps = [copy_prompt(llm, f"Item {i}: the {w} sailed at noon, the {w} sailed at noon.")
          for i, w in enumerate(["red ship", "old barge", "tall schooner"])]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = llm.generate(ps, params)
    got = tiny.generate(ps, params)
    stats = tiny.engine.stats()
    assert stats.preemptions_total > 0 and stats.spec_accepted_tokens_total > 0
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert_all_blocks_free(tiny)


def test_prefix_cache_hit_stop_strings_and_max_tokens(llm, spec_llm):
    prompt = copy_prompt(llm, "Every evening the keeper wrote the ships in a notebook and slept.")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = spec_llm.generate([prompt], free)[0]
    assert "notebook" in first.text
    # all cases in one batch, sharing the prompt's blocks that the first request left cached
    cases = [free,
             SamplingParams(temperature=0, max_tokens=24, stop=["notebook"], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[first.token_ids[9]],
                            ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=1),
             SamplingParams(temperature=0, max_tokens=24)]
    want = llm.generate([prompt] * len(cases), cases)
    got = spec_llm.generate([prompt] * len(cases), cases)
    assert all(g.num_cached_tokens >= 16 for g in got)
    assert got[0].token_ids == first.token_ids
    for g, w, params in zip(got, want, cases):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert len(g.token_ids) <= params.max_tokens
    assert got[1].finish_reason == got[2].finish_reason == "stop"
    assert len(got[3].token_ids) == 7 and len(got[4].token_ids) == 1
    assert_all_blocks_free(spec_llm)


def test_logprobs_are_the_target_models(llm, spec_llm):
    prompt = copy_prompt(llm, TEXT)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    want = llm.generate([prompt], params)[0]
    got = spec_llm.generate([prompt], params)[0]
    assert got.token_ids == want.token_ids
    assert [lp.token_id for lp in got.logprobs] == got.token_ids
    for a, b in zip(got.logprobs, want.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_seeded_sampling_is_reproducible_and_top_k_one_stays_greedy(llm, spec_llm):
    prompt = copy_prompt(llm, TEXT)
    seeded = SamplingParams(temperature=0.7, seed=5, max_tokens=24, ignore_eos=True)
    top_k1 = SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=24, ignore_eos=True)
    a, b, c = spec_llm.generate([prompt] * 3, [seeded, seeded, top_k1])
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert c.token_ids == greedy.token_ids


class WrongDrafter:
    """Drafts tokens the model will almost never choose."""

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return [17] * k


def test_rejected_drafts_return_every_block_and_change_nothing(llm, spec_llm, monkeypatch):
    eng = spec_llm.engine
    monkeypatch.setattr(eng, "drafter", WrongDrafter())
    ps = prompts(llm)[:4]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    before = eng.stats()
    got = spec_llm.generate(ps, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in llm.generate(ps, params)]
    stats = eng.stats()
    drafted = stats.spec_draft_tokens_total - before.spec_draft_tokens_total
    assert stats.spec_accepted_tokens_total == before.spec_accepted_tokens_total
    assert 0 < drafted < 4 * 23 / 2           # the adaptive length backed off
    assert_all_blocks_free(spec_llm)
    # abort in the middle of verification steps
    for i, p in enumerate(ps):
        eng.add_request(f"abort-{i}", prompt_token_ids=p, params=params)
    for _ in range(6):
        eng.step()
    assert eng.stats().spec_draft_tokens_total > stats.spec_draft_tokens_total
    assert all(eng.abort_request(f"abort-{i}") for i in range(4))
    assert_all_blocks_free(spec_llm)
