"""Structured output in the engine: answers fit their grammar in mixed batches, under chunked prefill,
preemption and speculative decoding; a dead-end grammar ends only its own request; bad grammars are
refused up front."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pdcluster.engine import LLM, SamplingParams
from pdcluster.engine.sampling import StructuredOutput
from pdcluster.engine.structured_output import unenforceable

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "scores"],
}


SMALL = {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                                         "tag": {"type": "string", "enum": ["x", "y"]}},
         "required": ["id", "ok", "tag"]}


def chat(llm: LLM, msg: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": msg}])


def json_params(schema: dict | None = None, **kw) -> SamplingParams:
    so = (StructuredOutput("json_schema", json.dumps(schema)) if schema is not None
          else StructuredOutput("json_object"))
    return SamplingParams(max_tokens=kw.pop("max_tokens", 160), structured_output=so, **kw)


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("bad", [
    ("xml", "<a/>"), ("json_schema", "{not json"), ("json_schema", '{"type": "objec"}'),
    ("regex", "(unclosed"), ("ebnf", "root ::= "), ("json_schema", ""),
])
def test_bad_grammars_are_refused_when_built(bad):
    with pytest.raises(ValueError, match="grammar|kind"):
        StructuredOutput(*bad)


# schemas using a keyword the grammar engine would drop, each with an instance its grammar accepted
# though the schema refuses it (found by probing xgrammar 0.2.9)
UNENFORCEABLE = [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "uniqueItems"),
    ({"type": "integer", "not": {"const": 1}}, "1", "not"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "if": {"properties": {"a": {"const": 1}}, "required": ["a"]}, "then": {"required": ["b"]}},
     '{"a": 1}', "if"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, '{"a": 1}', "dependentRequired"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "[2]", "contains"),
    ({"type": "number", "multipleOf": 0.5}, "1.25", "multipleOf"),
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}}},
     '{"code": "ABCDE"}', "maxLength"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "2", "allOf"),
    ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "{}",
     "required"),
    ({"type": "string", "enum": ["a", 1]}, "1", "type"),
    ({"type": "string", "pattern": "^(?!admin$)[a-z]+$"}, '"admin"', "lookaround"),
]


def _grammar_accepts(schema: dict, text: str) -> bool:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    return accepts(grammar, text)


@pytest.mark.parametrize("schema, breaks_it, keyword", UNENFORCEABLE)
def test_keywords_the_grammar_drops_are_named(schema, breaks_it, keyword):
    import jsonschema

    # what naming them is for: the grammar as compiled takes JSON the schema does not
    assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(breaks_it))
    assert _grammar_accepts(schema, breaks_it)
    nested = {"type": "object", "properties": {"outer": {"type": "array", "items": schema}}}
    assert keyword in unenforceable(schema)
    assert keyword in unenforceable(nested) and "/properties/outer/items" in unenforceable(nested)


def test_a_reference_outside_the_schema_is_named():
    # xgrammar warns and lets any value through where it cannot resolve a $ref
    schema = {"type": "object", "properties": {"a": {"$ref": "http://example.com/a.json"}}, "required": ["a"]}
    assert _grammar_accepts(schema, '{"a": 123}') and _grammar_accepts(schema, '{"a": "x"}')
    assert "$ref" in unenforceable(schema) and "/properties/a" in unenforceable(schema)
    assert unenforceable({"$defs": {"p": {"type": "integer"}}, "$ref": "#/$defs/p"}) is None


# schemas whose every keyword the grammar enforces, each with an instance that breaks it
ENFORCED = [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 1}, "[1, 1]"),
    ({"type": "integer", "multipleOf": 3}, "4"),
    ({"type": "string", "pattern": "^[a-z]{1,5}$"}, '"abcdef"'),
    ({"type": "string", "minLength": 1, "maxLength": 4}, '"abcde"'),
    ({"type": "string", "format": "uri", "minLength": 1}, '"not a uri"'),   # pydantic's AnyUrl
    ({"allOf": [{"type": "integer", "minimum": 3}]}, "2"),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "true"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {}}, '{"a": "x"}'),
    ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
      "type": "array", "items": {"$ref": "#/$defs/p"}}, "[{}]"),
]


@pytest.mark.parametrize("schema, breaks_it", ENFORCED)
def test_schemas_the_grammar_enforces_pass(schema, breaks_it):
    assert unenforceable(schema) is None
    assert not _grammar_accepts(schema, breaks_it)


@pytest.mark.parametrize("schema", [True, {"type": "objec", "enum": ["a"]}, {"required": "x"},
                                    {"properties": [], "required": [1]}, {"items": [{"not": None}]}])
def test_malformed_schemas_are_left_to_the_compiler(schema):
    assert unenforceable(schema) is None


def test_json_schema_and_object_in_a_mixed_batch(llm):
    long_prompt = chat(llm, "Describe a person as JSON. " + "Be precise and complete. " * 20)
    assert len(long_prompt) > 96                        # prefilled in chunks
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = chat(llm, "Write a haiku about the sea.")
    alone = llm.generate([free], plain)[0]
    outs = llm.generate(
        [long_prompt, chat(llm, "Give me a JSON object about a cat."), free,
         chat(llm, "A record, please.")],
        [json_params(PERSON, temperature=0), json_params(temperature=0.9, seed=7, max_tokens=48), plain,
         json_params(SMALL, temperature=1.0, seed=3)])
    assert outs[0].finish_reason == "stop", outs[0].text
    jsonschema.validate(json.loads(outs[0].text), PERSON)
    jsonschema.validate(json.loads(outs[3].text), SMALL)
    assert outs[1].finish_reason in ("stop", "length")
    if outs[1].finish_reason == "stop":
        assert isinstance(json.loads(outs[1].text), dict)
    assert outs[1].text.startswith("{")
    # the unconstrained row of the batch is untouched by the others' masks
    assert outs[2].token_ids == alone.token_ids
    assert_all_blocks_free(llm)


def test_regex_ebnf_and_grammar_end_under_ignore_eos(llm):
    p = chat(llm, "Pick a number.")
    outs = llm.generate([p, p], [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                       structured_output=StructuredOutput("regex", r"[0-9]{3}-[a-c]{2}")),
        SamplingParams(temperature=0.7, seed=1, max_tokens=30,
                       structured_output=StructuredOutput("ebnf", 'root ::= ("yes" | "no") "!"'))])
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("yes!", "no!") and outs[1].finish_reason == "stop"


def test_dead_end_grammar_fails_only_its_request(llm):
    # the grammar must end after "a", but min_tokens forbids EOS: no token is allowed
    p = chat(llm, "Say a.")
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([p], plain)[0]
    outs = llm.generate([p, p], [
        SamplingParams(temperature=0, max_tokens=12, min_tokens=5,
                       structured_output=StructuredOutput("regex", "a")), plain])
    assert outs[0].finish_reason == "error" and outs[0].text == "a"
    assert outs[1].token_ids == alone.token_ids
    assert_all_blocks_free(llm)
    # the engine reports why
    eng = llm.engine
    eng.add_request("dead", prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=12, min_tokens=5, structured_output=StructuredOutput("regex", "a")))
    last = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            last = out
    assert last.finished and "grammar allows no next token" in last.error


def test_resumed_tokens_must_fit_the_grammar(llm):
    p = chat(llm, "JSON please.")
    bad = llm.tokenizer.encode("hello", add_special_tokens=False)
    llm.generate([p], json_params(max_tokens=2))   # json_object is compiled: checked when added
    with pytest.raises(ValueError, match="structured output"):
        llm.engine.add_request("resume-bad", prompt_token_ids=p, params=json_params(),
                               generated_token_ids=bad)
    assert "resume-bad" not in llm.engine._seqs
    # a grammar still compiling: checked once it is, and the request ends with the error
    fresh = {"type": "object", "properties": {"resumed": {"type": "boolean"}}, "required": ["resumed"]}
    llm.engine.add_request("resume-bad-2", prompt_token_ids=p, params=json_params(fresh),
                           generated_token_ids=bad)
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("resume-bad-2", "error")]
    assert "structured output" in outs[0].error and outs[0].new_token_ids == []
    assert_all_blocks_free(llm)
    # a valid prefix continues from where it was: the answer is the uninterrupted one
    full = llm.generate([p], json_params(PERSON, temperature=0))[0]
    head = full.token_ids[:5]
    llm.engine.add_request("resume-ok", prompt_token_ids=p, params=json_params(PERSON, temperature=0),
                           generated_token_ids=head)
    rest: list[int] = []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            rest += out.new_token_ids
    assert head + rest == full.token_ids


def test_preemption_and_speculation_keep_grammar_outputs(llm):
    prompts = [chat(llm, f"Record {i} as JSON. " + "Repeat: id, ok, tag. " * 6) for i in range(3)]
    params = json_params(SMALL, temperature=0, max_tokens=48, min_tokens=4)
    expected = llm.generate(prompts, params)
    # 3 sequences of ~90 tokens in 12 blocks of 16: preempts; speculation on (they draft nothing)
    tiny = LLM(num_kv_blocks=12, max_num_batched_tokens=64, enable_prefix_caching=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    got = tiny.generate(prompts, params)
    assert tiny.engine.stats().preemptions_total > 0
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    for g in got:
        jsonschema.validate(json.loads(g.text), SMALL)
    assert_all_blocks_free(tiny)


def _slow_schema(n: int) -> str:
    """A schema xgrammar takes a while to parse (~0.5 s at n = 3000 here), distinct per n."""
    return json.dumps({"type": "object", "properties": {"w": {"type": "string", "pattern": f"^[a-z]{{1,{n}}}$"}},
                       "required": ["w"]})


def test_a_grammar_too_slow_to_check_is_refused_then_at_once():
    from pdcluster.engine.structured_output import check_within_budget

    slow = _slow_schema(3001)
    with pytest.raises(ValueError, match="too complex"):
        check_within_budget("json_schema", slow, budget_s=0.01)
    with pytest.raises(ValueError, match="too complex"):   # the same grammar, however long it may take
        check_within_budget("json_schema", slow, budget_s=60)
    check_within_budget("json_schema", json.dumps(SMALL), budget_s=60)
    with pytest.raises(ValueError, match="invalid json_schema grammar"):   # bad ones are still named
        check_within_budget("json_schema", '{"type": "objec"}', budget_s=60)


def test_the_batch_steps_on_while_a_newcomers_grammar_compiles(llm):
    from pdcluster.engine import structured_output

    eng = llm.engine
    p = chat(llm, "Write one lowercase word.")
    eng.add_request("plain", prompt_token_ids=p,
                    params=SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    while not eng.stats().num_running:
        eng.step()
    so = StructuredOutput("json_schema", _slow_schema(3002))
    structured_output._parse.cache_clear()   # as in an engine process of its own: it parses anew
    eng.add_request("constrained", prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=12, structured_output=so))
    eng.add_request("aborted", prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=12, structured_output=so))
    assert eng.abort_request("aborted")   # while its grammar compiles: nothing to give back
    texts = {"constrained": "", "plain": ""}
    plain_tokens = 0
    while "constrained" in eng._compiling:
        for out in eng.step():
            texts[out.request_id] += out.delta_text
            plain_tokens += len(out.new_token_ids) * (out.request_id == "plain")
    assert plain_tokens >= 3   # the running request decoded while the grammar compiled
    while eng.has_unfinished_requests():
        for out in eng.step():
            texts[out.request_id] += out.delta_text
    assert "aborted" not in texts
    assert re.fullmatch(r'\{"w": ?"[a-z]+("\})?', texts["constrained"]), texts["constrained"]
    assert_all_blocks_free(llm)


def test_a_check_that_waits_for_a_busy_thread_is_busy_not_too_complex():
    import threading

    from pdcluster.engine import structured_output as so

    slow = [_slow_schema(3003), _slow_schema(3004)]   # both grammar-check threads held ~0.5 s
    threads = [threading.Thread(target=so.check_within_budget, args=("json_schema", g, 60)) for g in slow]
    for t in threads:
        t.start()
    while sum(c.started.is_set() for k, c in list(so._checks.items()) if k[1] in slow) < 2:
        threading.Event().wait(0.001)
    with pytest.raises(so.GrammarChecksBusy):
        so.check_within_budget("regex", "ab+c", budget_s=0.05)
    for t in threads:
        t.join()
    so.check_within_budget("regex", "ab+c", budget_s=60)   # its turn came: not held against it


def test_an_engine_waiting_only_for_a_grammar_does_not_spin(llm):
    from pdcluster.engine import structured_output

    eng = llm.engine
    so = StructuredOutput("json_schema", _slow_schema(3005))
    structured_output._parse.cache_clear()
    eng.add_request("lone", prompt_token_ids=chat(llm, "Hi."), params=SamplingParams(
        temperature=0, max_tokens=2, structured_output=so))
    steps = 0
    while "lone" in eng._compiling:
        eng.step()
        steps += 1
    assert steps < 40   # ~0.5 s of compile in waits of up to 50 ms, not a busy loop
    while eng.has_unfinished_requests():
        eng.step()
    # the only request waiting for a compile leaves: the compile is forgotten
    so2 = StructuredOutput("json_schema", _slow_schema(3006))
    structured_output._parse.cache_clear()
    eng.add_request("gone", prompt_token_ids=chat(llm, "Hi."), params=SamplingParams(
        temperature=0, max_tokens=2, structured_output=so2))
    assert eng.abort_request("gone") and not eng.has_unfinished_requests()
    assert ("json_schema", so2.grammar) not in eng.grammar._pending
    assert_all_blocks_free(llm)


def test_a_compile_that_raises_fails_its_request_not_the_batch(llm, monkeypatch):
    eng = llm.engine
    p = chat(llm, "Count.")
    eng.add_request("plain", prompt_token_ids=p,
                    params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    broken = StructuredOutput("regex", "[a-z]+ broken")

    def compile_or_fail(kind, grammar):
        raise RuntimeError("xgrammar failed")   # xgrammar's own errors are not ValueErrors
    monkeypatch.setattr(eng.grammar, "_compile_uncached", compile_or_fail)
    eng.add_request("broken", prompt_token_ids=p, params=SamplingParams(
        temperature=0, max_tokens=8, structured_output=broken))
    ends = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                ends[out.request_id] = (out.finish_reason, out.error)
    assert ends["plain"] == ("length", None)
    assert ends["broken"][0] == "error" and "xgrammar failed" in ends["broken"][1]
    assert_all_blocks_free(llm)
