"""Stream-interval coalescing of step outputs: a running request's tokens leave `interval` at a time,
its first and last output, an error and a handoff at once, and what the consumer assembles (tokens,
text, logprobs, how it ended) is exactly what the uncoalesced outputs give."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdcluster.actors.output_coalescer import OutputCoalescer
from pdcluster.engine.outputs import RequestOutput, TokenLogprob


def _out(rid: str, tokens: list[int], done: bool = False, reason: str | None = None, n: int = 0,
         handoff=None, error=None) -> RequestOutput:
    return RequestOutput(rid, tokens, "".join(f"<{t}>" for t in tokens), done,
                         reason if done else None, 7, n, 0,
                         logprobs=[TokenLogprob(t, -t / 100) for t in tokens],
                         kv_handoff=handoff, error=error)


def _stream(c: OutputCoalescer, steps: list[list]) -> list[list]:
    return [c.feed(step) for step in steps]


def test_interval_one_passes_every_step_through_untouched():
    c = OutputCoalescer(1)
    step = [("a", _out("a", [1])), ("b", RuntimeError("x"))]
    assert c.feed(step) is step


def test_first_output_goes_at_once_then_tokens_leave_interval_at_a_time():
    c = OutputCoalescer(3)
    sent = _stream(c, [[("a", _out("a", [t], n=t))] for t in range(1, 9)])
    assert [[o.new_token_ids for _, o in s] for s in sent] == [
        [[1]], [], [], [[2, 3, 4]], [], [], [[5, 6, 7]], []]
    merged = sent[3][0][1]
    assert merged.delta_text == "<2><3><4>" and merged.num_output_tokens == 4
    assert [lp.token_id for lp in merged.logprobs] == [2, 3, 4]
    assert c.num_held == 1   # token 8 waits for two more, or for the end


def test_the_last_output_flushes_what_is_held():
    c = OutputCoalescer(4)
    c.feed([("a", _out("a", [1]))])
    c.feed([("a", _out("a", [2]))])
    (rid, last), = c.feed([("a", _out("a", [3], done=True, reason="stop", n=3))])
    assert rid == "a" and last.new_token_ids == [2, 3] and last.finished
    assert last.finish_reason == "stop" and last.delta_text == "<2><3>" and c.num_held == 0


def test_an_error_goes_after_what_was_held_and_the_request_is_forgotten():
    c = OutputCoalescer(4)
    c.feed([("a", _out("a", [1]))])
    c.feed([("a", _out("a", [2]))])
    boom = RuntimeError("engine step failed")
    sent = c.feed([("a", boom)])
    assert [x if isinstance(x, BaseException) else x.new_token_ids for _, x in sent] == [[2], boom]
    # a new request reusing nothing of it: its first output goes at once
    assert c.feed([("a", _out("a", [9]))])[0][1].new_token_ids == [9]


def test_handoffs_grammar_errors_and_speculated_runs_are_not_held():
    c = OutputCoalescer(4)
    c.feed([("p", _out("p", [1])), ("g", _out("g", [1])), ("s", _out("s", [1]))])
    sent = dict(c.feed([("p", _out("p", [2], handoff=object())),
                        ("g", _out("g", [], error="dead end")),
                        ("s", _out("s", [2, 3, 4, 5]))]))   # accepted drafts: interval reached
    assert set(sent) == {"p", "g", "s"} and sent["s"].new_token_ids == [2, 3, 4, 5]


def test_an_aborted_request_loses_what_it_held():
    c = OutputCoalescer(4)
    c.feed([("a", _out("a", [1])), ("b", _out("b", [1]))])
    c.feed([("a", _out("a", [2])), ("b", _out("b", [2]))])
    c.drop("a")
    assert c.num_held == 1
    (rid, out), = c.feed([("b", _out("b", [3], done=True, reason="length"))])
    assert rid == "b" and out.new_token_ids == [2, 3]


def test_an_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        OutputCoalescer(0)


@settings(max_examples=200, deadline=None)
@given(interval=st.integers(1, 6), data=st.data())
def test_consumers_assemble_exactly_the_uncoalesced_streams(interval, data):
    # several requests, each a run of 0-3-token outputs ending finished, interleaved over steps
    lengths = data.draw(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12),
                                 min_size=1, max_size=4))
    pending = {f"r{i}": [list(range(100 * i + 10 * j, 100 * i + 10 * j + k)) for j, k in enumerate(ls)]
               for i, ls in enumerate(lengths)}
    rnd = data.draw(st.randoms(use_true_random=False))
    failing = {rid for rid in pending if rnd.random() < 0.3}   # these end in an exception instead
    steps = []
    while any(pending.values()):
        step = []
        for rid, outs in pending.items():
            if outs and rnd.random() < 0.7:
                tokens = outs.pop(0)
                if not outs and rid in failing:
                    step.append((rid, RuntimeError(f"{rid} failed")))
                else:
                    step.append((rid, _out(rid, tokens, done=not outs, reason="length")))
        steps.append(step)
    expected = {rid: [o for s in steps for r, o in s if r == rid] for rid in pending}

    c = OutputCoalescer(interval)
    got: dict[str, list[RequestOutput]] = {rid: [] for rid in pending}
    for step in steps:
        for rid, out in c.feed(step):
            got[rid].append(out)
    assert c.num_held == 0
    for rid, outs in expected.items():
        sent = got[rid]
        if rid in failing:   # what was held goes out, then the exception, last
            assert sent[-1] is outs[-1] and isinstance(sent[-1], RuntimeError)
            sent, outs = sent[:-1], outs[:-1]
            assert not any(o.finished for o in sent)
            if not outs:
                continue
        assert [t for o in sent for t in o.new_token_ids] == [t for o in outs for t in o.new_token_ids]
        assert "".join(o.delta_text for o in sent) == "".join(o.delta_text for o in outs)
        assert [lp for o in sent for lp in o.logprobs] == [lp for o in outs for lp in o.logprobs]
        assert sent[0] is outs[0]                            # the first output, at once, as made
        if rid in failing:
            continue
        assert sent[-1].finished and not any(o.finished for o in sent[:-1])
        # between the first and the last, nothing leaves with fewer than `interval` tokens
        assert interval == 1 or all(len(o.new_token_ids) >= interval for o in sent[1:-1])
