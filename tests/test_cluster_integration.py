"""The served cluster end to end on real Ray, a real mooncake_master and the embedded model: OpenAI
HTTP (stock `openai` client) and gRPC answers, errors, metrics, and a client that walks away."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import cluster_harness as h
import grpc
import httpx
import jsonschema
import openai
import pytest
from pdcluster.engine.sampling import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Write two sentences about the sea."}]
UI_ORIGIN = "https://ui.example.com"   # a web UI the spec lets call the API from a browser


@pytest.fixture(scope="module")
def cluster():
    import ray

    # engine.threads unset, as in a user's spec: the two workers share this machine's cores; tokens
    # leave the engine 3 at a time (engine.stream_interval): every answer below is still the
    # offline engine's, token for token
    spec = h.small_spec(engine={"threads": None, "stream_interval": 3},
                        serve={"cors_allowed_origins": [UI_ORIGIN]})
    ray.init(num_cpus=4, include_dashboard=False, resources={"pd_prefill": 1, "pd_decode": 1})
    try:
        base = h.serve_cluster(spec)
        yield spec, base
    finally:
        h.stop_cluster()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_streamed_chat_equals_offline_greedy_output(client, llm):
    stream = client.chat.completions.create(
        model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    offline = llm.generate([llm.chat_prompt(QUESTION)], SamplingParams(temperature=0, max_tokens=48))[0]
    assert len(offline.token_ids) > 8  # long enough that decode, not just prefill, produced most of it
    assert text == offline.text
    assert finish == offline.finish_reason
    assert roles == ["assistant"]
    assert usage.completion_tokens == len(offline.token_ids)
    assert usage.prompt_tokens == len(llm.chat_prompt(QUESTION))


def test_continuous_usage_stats_count_every_chunks_tokens(client):
    # the cluster streams 3 tokens at a time: a chunk's usage counts all of them
    stream = client.chat.completions.create(
        model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=20, stream=True,
        extra_body={"ignore_eos": True}, stream_options={"continuous_usage_stats": True})
    counts = [chunk.usage.completion_tokens for chunk in stream]
    assert counts[0] == 0 and counts[-1] == 20        # the role chunk, then every token
    assert counts == sorted(counts)
    assert any(b - a > 1 for a, b in zip(counts, counts[1:]))   # a chunk of several tokens


def test_non_streaming_finish_reasons_and_usage(client, cluster):
    full = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=48)
    answer = full.choices[0].message.content
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    short = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert answer.startswith(short.choices[0].message.content)

    # max_tokens=1 is served by the prefill worker alone
    one = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    assert answer.startswith(one.choices[0].message.content)

    cut = answer.split()[3]  # a word in the middle of the greedy answer
    stopped = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0,
                                             max_tokens=48, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == answer[:answer.index(cut)]

    comp = client.completions.create(model=h.MODEL, prompt="The capital of France is", max_tokens=6,
                                     temperature=0, seed=3)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 6
    sampled = [client.completions.create(model=h.MODEL, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=11).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same tokens


def test_errors_use_openai_bodies(client, cluster):
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert nf.value.body["code"] == "model_not_found" and nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=h.MODEL, prompt="hi", max_tokens=10**6)
    assert long.value.body["code"] == "context_length_exceeded"
    r = httpx.post(cluster[1] + "/v1/completions", content=b"{oops", timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(cluster[1] + "/v1/engines", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]


# Several schemas, each with what JSON-schema coverage must include: nested objects, enums, arrays with
# bounds, numbers with bounds.
SCHEMAS = {
    "order": {"type": "object", "properties": {
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20},
            "tier": {"type": "string", "enum": ["gold", "silver", "bronze"]}},
            "required": ["name", "tier"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}},
        "required": ["customer", "items"]},
    "reading": {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": -50, "maximum": 60},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["rain", "sun", "wind"]},
                 "minItems": 2, "maxItems": 2}},
        "required": ["celsius", "ok", "tags"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": f"Give me an example {name} as JSON."}]
    full = client.chat.completions.create(model=h.MODEL, messages=msgs, temperature=0, max_tokens=120,
                                          response_format=fmt)
    assert full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full.choices[0].message.content), schema)
    # streamed and sampled (through the prefill -> decode handoff): still valid
    stream = client.chat.completions.create(model=h.MODEL, messages=msgs, temperature=1.0, seed=5,
                                            max_tokens=120, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_structured_output_errors_are_400(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=h.MODEL, messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}})
    assert bad.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=h.MODEL, messages=QUESTION, top_logprobs=2)
    assert bad.value.body["param"] == "top_logprobs"


def test_a_dead_end_grammar_streams_its_text_before_the_error(cluster):
    # the grammar must end after "aaa", but min_tokens forbids the end: the answer dead-ends there,
    # and the tokens still held for the stream interval go out before the error
    body = {"model": h.MODEL, "prompt": "Answer:", "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "s", "schema": {"type": "string", "pattern": "^a{3}$"}}}}
    plain = httpx.post(cluster[1] + "/v1/completions", json=body, timeout=120).json()
    assert plain["choices"][0]["text"] == '"aaa"'
    text, errors = "", []
    with httpx.stream("POST", cluster[1] + "/v1/completions", json={**body, "min_tokens": 20, "stream": True},
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                errors += [event["error"]] if "error" in event else []
                text += "".join(c["text"] for c in event.get("choices", []))
    assert text == '"aaa"' and [e["code"] for e in errors] == ["structured_output_failed"]


def test_top_logprobs_match_the_engine(client, llm):
    from pdcluster.engine.sampling import SamplingParams as SP

    offline = llm.generate([llm.chat_prompt(QUESTION)], SP(temperature=0, max_tokens=6, logprobs=3))[0]
    full = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 3 for c in content)
    for got, want in zip(content, offline.logprobs):
        assert got.token == llm.tokenizer.decode([want.token_id], skip_special_tokens=False)
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in want.top], abs=1e-4)
        assert got.bytes == list(llm.tokenizer.token_bytes(want.token_id))
    stream = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    # the same tokens and values (up to float noise: the prompt's KV may now come from the cache)
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    comp = client.completions.create(model=h.MODEL, prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    # streamed, text held back for a possible stop string does not shift the offsets
    ask = dict(model=h.MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=1,
               stop="zzzzzz")
    whole = client.completions.create(**ask).choices[0].logprobs
    chunks = [ch.logprobs for chunk in client.completions.create(**ask, stream=True) for ch in chunk.choices
              if ch.logprobs]
    assert [o for c in chunks for o in c.text_offset] == whole.text_offset
    assert [t for c in chunks for t in c.tokens] == whole.tokens


def test_logit_bias_forces_its_token(client, llm):
    token = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    comp = client.completions.create(model=h.MODEL, prompt="My favourite colour is", max_tokens=3,
                                     temperature=1.0, logit_bias={str(token): 100})
    assert comp.choices[0].text == llm.tokenizer.decode([token] * 3)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=h.MODEL, prompt="x", logit_bias={"10000000": 5})
    assert bad.value.body["param"] == "logit_bias"


def _worker_stats(role: str) -> dict:
    (stats,) = [w.report.stats for w in h.snapshot().workers if w.info.role == role]
    return stats


def test_n_choices_share_the_prompt_blocks(client, llm):
    """n=3 returns three choices; the prompt is computed once (the other choices find its full
    blocks in the prefill worker's cache); greedy choices all equal the offline answer, streamed by
    index; a seed makes the whole set reproducible while the choices differ."""
    import uuid

    messages = [{"role": "user", "content": f"Request {uuid.uuid4().hex}: list the planets of the solar "
                                            f"system, from the closest to the sun to the farthest."}]
    prompt_len = len(llm.chat_prompt(messages))
    bs = h.snapshot().workers[0].info.block_size
    assert prompt_len >= 3 * bs
    h.wait_idle()
    time.sleep(0.6)  # one poll: the router's copy of the worker's counters is fresh
    before = _worker_stats("prefill")
    full = client.chat.completions.create(model=h.MODEL, messages=messages, n=3, temperature=0, max_tokens=8)
    time.sleep(0.6)
    after = _worker_stats("prefill")
    offline = llm.generate([llm.chat_prompt(messages)], SamplingParams(temperature=0, max_tokens=8))[0]
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert [c.message.content for c in full.choices] == [offline.text] * 3
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.completion_tokens == 3 * len(offline.token_ids)
    cached = (prompt_len - 1) // bs * bs  # full blocks before the last prompt token, which is computed
    hits = after["prefix_hit_tokens_total"] - before["prefix_hit_tokens_total"]
    computed = after["computed_tokens_total"] - before["computed_tokens_total"]
    assert hits >= 2 * cached, (hits, cached)
    assert computed <= prompt_len + 2 * (prompt_len - cached), (computed, prompt_len)

    stream = client.chat.completions.create(model=h.MODEL, messages=messages, n=2, temperature=0,
                                            max_tokens=8, stream=True)
    texts, finishes = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [offline.text] * 2 and finishes == [offline.finish_reason] * 2

    sampled = [client.completions.create(model=h.MODEL, prompt="Once upon a time", n=3, temperature=1.0,
                                         seed=11, max_tokens=12) for _ in range(2)]
    runs = [[c.text for c in sorted(s.choices, key=lambda c: c.index)] for s in sampled]
    assert runs[0] == runs[1]          # seeded: the same set again
    assert len(set(runs[0])) > 1       # choice i samples with seed + i

    # without max_tokens each choice may run to the context's end, which n of them could not hold
    # in the decode pool at once: they are served, each within what the pool holds
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    pool = sum(w.info.num_total_blocks for w in h.snapshot().workers if w.info.role == "decode")
    assert 2 * llm.engine.max_model_len > pool * bs
    answer = llm.generate([llm.chat_prompt(ask)], SamplingParams(temperature=0, max_tokens=200))[0]
    assert answer.finish_reason == "stop"
    both = client.chat.completions.create(model=h.MODEL, messages=ask, n=2, temperature=0)
    assert [(c.message.content, c.finish_reason) for c in both.choices] == [(answer.text, "stop")] * 2


def test_models_and_health(client, cluster):
    import openai

    assert [m.id for m in client.models.list().data] == [h.MODEL]
    assert client.models.retrieve(h.MODEL).id == h.MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    # `created` is when the answer was made (it was the server's start time)
    t0 = time.time()
    created = client.completions.create(model=h.MODEL, prompt="Hi", max_tokens=1).created
    assert int(t0) <= created <= time.time() + 1
    health = httpx.get(cluster[1] + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for path in ("/health", "/v1/models", "/metrics"):   # every GET route answers HEAD too
        head = httpx.head(cluster[1] + path, timeout=30)
        assert (head.status_code, head.content) == (200, b""), path
    # an event stream is never cached nor held back by a buffering proxy in front
    body = {"model": h.MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", cluster[1] + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert (resp.headers["cache-control"], resp.headers["x-accel-buffering"]) == ("no-cache", "no")
        assert resp.read().decode().rstrip().endswith("data: [DONE]")


def test_browser_pages_of_allowed_origins_only_may_call_the_api(cluster):
    url = cluster[1] + "/v1/chat/completions"
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = httpx.options(url, headers={"Origin": UI_ORIGIN, **ask}, timeout=30)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(url, headers={"Origin": "https://evil.example", **ask}, timeout=30)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    body = {"model": h.MODEL, "messages": QUESTION, "max_tokens": 2}
    answered = httpx.post(url, json=body, headers={"Origin": UI_ORIGIN}, timeout=60)
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == UI_ORIGIN
    refused = httpx.post(url, json={**body, "temperature": 9}, headers={"Origin": UI_ORIGIN}, timeout=60)
    assert refused.status_code == 400 and refused.headers["access-control-allow-origin"] == UI_ORIGIN
    # a page of another site is refused before anything runs, even with a body no preflight
    # guards (no Content-Type), and gets no header that would let its script read the answer
    elsewhere = httpx.post(url, content=json.dumps(body).encode(), timeout=60,
                           headers={"Origin": "https://evil.example"})
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in elsewhere.headers
    # reading needs no refusal: without CORS headers the page cannot read the answer
    models = httpx.get(cluster[1] + "/v1/models", headers={"Origin": "https://evil.example"}, timeout=30)
    assert models.status_code == 200 and "access-control-allow-origin" not in models.headers


def test_grpc_health_reflection_and_every_calls_outcome_counted(cluster):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)
    from pdcluster.proto import inference_pb2 as pb
    from pdcluster.proto import inference_pb2_grpc as pb_grpc

    spec, base = cluster
    service = pb.DESCRIPTOR.services_by_name["Inference"].full_name
    serving = health_pb2.HealthCheckResponse.SERVING
    before = h.metric_values(httpx.get(base + "/metrics", timeout=30).text)
    with grpc.insecure_channel(f"127.0.0.1:{spec.serve.grpc_port}") as channel:
        # gRPC's standard Health service, as Kubernetes' gRPC probes ask it
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status == serving
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert next(watch).status == serving
        watch.cancel()
        # Reflection: a client without inference.proto finds the method and its message types
        db = ProtoReflectionDescriptorDatabase(channel)
        assert service in db.get_services()
        method = DescriptorPool(db).FindServiceByName(service).FindMethodByName("Generate")
        assert method.server_streaming and \
            method.input_type.full_name == pb.GenerateRequest.DESCRIPTOR.full_name
        assert [f.name for f in method.input_type.fields] == \
            [f.name for f in pb.GenerateRequest.DESCRIPTOR.fields]
        # one call answered, one refused: each counted by its final status
        stub = pb_grpc.InferenceStub(channel)
        assert list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2), timeout=120))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", n=0), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = h.metric_values(httpx.get(base + "/metrics", timeout=30).text)

    def delta(code):
        key = ("pdcluster_grpc_responses_total", (("code", code), ("method", "Generate")))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert (delta("OK"), delta("INVALID_ARGUMENT")) == (1, 1)


def test_prefill_and_decode_split_the_cores_and_decode_may_take_the_idle_ones(cluster):
    import os

    workers = {w.info.role: w.info for w in h.snapshot().workers}
    usable = min(len(os.sched_getaffinity(0)), 4)   # Ray offers 4 CPUs; fewer cores cap it
    assert workers["prefill"].threads == workers["decode"].threads == max(1, usable // 2)
    if usable > 1:   # decode steps may take the host's cores; prefill keeps its share, on the board
        assert workers["decode"].most_threads == usable
        assert workers["prefill"].most_threads == workers["prefill"].threads


def test_grpc_generate_streams_the_same_answer(client, cluster):
    from pdcluster.proto import inference_pb2 as pb
    from pdcluster.proto import inference_pb2_grpc as pb_grpc

    spec, _ = cluster
    http = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    with grpc.insecure_channel(f"127.0.0.1:{spec.serve.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        msgs = list(stub.Generate(pb.GenerateRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in QUESTION],
            max_tokens=24, temperature=0), timeout=120))
        assert len(msgs) > 2  # streamed, not one blob
        assert "".join(m.text for m in msgs) == http.choices[0].message.content
        assert msgs[-1].finish_reason == http.choices[0].finish_reason
        assert msgs[-1].usage.completion_tokens == sum(len(m.token_ids) for m in msgs)
        # n choices: tokens tagged by index, usage once at the end, summed over the choices
        msgs = list(stub.Generate(pb.GenerateRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in QUESTION],
            max_tokens=24, temperature=0, n=2), timeout=120))
        assert {m.index for m in msgs} == {0, 1}
        for i in (0, 1):
            mine = [m for m in msgs if m.index == i]
            assert "".join(m.text for m in mine) == http.choices[0].message.content
            assert mine[-1].finish_reason == http.choices[0].finish_reason
        assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
        assert msgs[-1].usage.completion_tokens == sum(len(m.token_ids) for m in msgs)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", n=0), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", temperature=5), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", model="gpt-4"), timeout=60))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # the sampling fields: logprobs per token, a JSON schema, a bad schema refused
        schema = SCHEMAS["reading"]
        msgs = list(stub.Generate(pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="A weather reading as JSON.")], max_tokens=80,
            temperature=0, logprobs=2, presence_penalty=0.1,
            response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(schema))),
            timeout=120))
        jsonschema.validate(json.loads("".join(m.text for m in msgs)), schema)
        assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
        assert all(len(lp.top) == 2 for m in msgs for lp in m.logprobs)
        prompted = list(stub.Generate(pb.GenerateRequest(   # a prompt takes a schema too
            prompt="A weather reading as JSON:", max_tokens=80, temperature=0,
            response_format=pb.ResponseFormat(type="json_schema", json_schema=json.dumps(schema))),
            timeout=120))
        jsonschema.validate(json.loads("".join(m.text for m in prompted)), schema)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content="x")],
                response_format=pb.ResponseFormat(type="json_schema", json_schema='{"type": "objec"}')),
                timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_prompt_without_max_tokens_runs_until_the_model_stops(client, cluster, llm):
    # inference.proto: max_tokens unset means until the end of the context (not completions' 16),
    # or of what a worker's KV cache holds (this cluster's, 2048 tokens, is under the context)
    from pdcluster.proto import inference_pb2 as pb
    from pdcluster.proto import inference_pb2_grpc as pb_grpc

    ids = llm.chat_prompt(QUESTION)
    offline = llm.generate([ids], SamplingParams(temperature=0, max_tokens=400))[0]
    assert 16 < len(offline.token_ids) < 400 and offline.finish_reason == "stop"
    with grpc.insecure_channel(f"127.0.0.1:{cluster[0].serve.grpc_port}") as channel:
        msgs = list(pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(prompt_token_ids=ids, temperature=0, min_tokens=17), timeout=120))
    assert [t for m in msgs for t in m.token_ids] == offline.token_ids
    assert msgs[-1].finish_reason == "stop"
    chat = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (offline.text, "stop")


def test_metrics_move_when_requests_are_served(client, cluster):
    base = cluster[1]
    before = h.metric_values(httpx.get(base + "/metrics", timeout=30).text)
    done = client.chat.completions.create(model=h.MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    after = h.metric_values(httpx.get(base + "/metrics", timeout=30).text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for hist in ("pdcluster_ttft_seconds", "pdcluster_tpot_seconds", "pdcluster_e2e_latency_seconds",
                 "pdcluster_first_to_second_token_seconds"):
        assert delta(hist + "_count") == 1, hist
    assert delta("pdcluster_admissions_total") == 1
    assert delta("pdcluster_requests_total", status="ok") == 1
    assert delta("pdcluster_generation_tokens_total") == done.usage.completion_tokens
    assert delta("pdcluster_prompt_tokens_total") == done.usage.prompt_tokens
    # the same prompt ran before: its full blocks come from the prefix cache
    assert delta("pdcluster_prefix_cache_hit_tokens_total") >= 16
    assert after[("pdcluster_kv_handoff_bytes_total", ())] > 0  # KV really moved through the store
    for name in ("pdcluster_queue_depth", "pdcluster_inflight_requests"):
        assert (name, ()) in after
    for worker, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        labels = (("role", role), ("worker", worker))
        assert ("pdcluster_worker_free_blocks", labels) in after
        assert ("pdcluster_worker_running_seqs", labels) in after


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 1500}),
    ("/v1/responses", {"input": "Count: 1, 2, 3,", "max_output_tokens": 1500})])
def test_client_disconnect_frees_its_slot_and_blocks(cluster, path, body):
    base = cluster[1]
    body = {"model": h.MODEL, **body, "ignore_eos": True, "temperature": 0, "stream": True}
    cancelled = ("pdcluster_requests_total", (("status", "cancelled"),))
    before = h.metric_values(httpx.get(base + "/metrics", timeout=30).text).get(cancelled, 0)
    with httpx.stream("POST", base + path, json=body, timeout=60) as resp:
        assert resp.status_code == 200
        chunks = 0
        for line in resp.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 6:   # tokens have streamed (the Responses API's first events are not tokens)
                break
        snap = h.snapshot()
        assert snap.in_flight == 1, h.describe(snap)
    # 1500 tokens take over a minute on this CPU: idle within 20 s means the request was aborted,
    # its decode sequence freed and its admission slot released.
    h.wait_idle(20)
    after = h.metric_values(httpx.get(base + "/metrics", timeout=30).text)
    statuses = {k: v for k, v in after.items() if k[0] == "pdcluster_requests_total"}
    assert after.get(cancelled, 0) == before + 1, statuses


def _stream(base: str, max_tokens: int, out: list, started: threading.Event) -> None:
    h.stream_completion(base, "Count: 1, 2, 3,", max_tokens, out, started)


def _streams_in_flight(base: str, n: int, max_tokens: int) -> tuple[list[threading.Thread], list[list]]:
    outs: list[list] = [[] for _ in range(n)]
    started = [threading.Event() for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(base, max_tokens, o, e)) for o, e in zip(outs, started)]
    for t in threads:
        t.start()
    for e, o in zip(started, outs):
        assert e.wait(120), o
    return threads, outs


def _served_within(base: str, timeout_s: float) -> float:
    """Seconds until a new request is answered 200."""
    t0 = time.monotonic()
    while True:
        try:
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": h.MODEL, "prompt": "Hi", "max_tokens": 2})
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < timeout_s, "no request served after the kill"
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_router_killed_streams_complete_and_its_state_is_rebuilt(cluster):
    """SIGKILL the router's process with streams in flight: Ray restarts it, the streams finish (tokens
    never pass through it), the new router counts them again from the ingress's lease, new requests
    are served, and no worker is restarted (no model reload)."""
    import ray

    base, router = cluster[1], h.router()
    old_pid = ray.get(router.pid.remote(), timeout=30)
    workers = {w: i.pid for w, i in ray.get(h.controller().ready.remote(), timeout=30).workers.items()}
    threads, outs = _streams_in_flight(base, 2, 160)
    os.kill(old_pid, signal.SIGKILL)
    h.wait_for(lambda: ray.get(router.pid.remote(), timeout=60) != old_pid, timeout_s=60)
    h.wait_for(lambda: h.snapshot().in_flight == 2, timeout_s=15)  # restored from the lease
    assert _served_within(base, 60) < 60
    for t in threads:
        t.join(180)
    for out in outs:
        assert out[0] == 200 and out[-1] == "[DONE]", out[-3:]
        chunks = [c for c in out[1:-1] if isinstance(c, dict)]
        assert not any("error" in c for c in chunks), chunks[-3:]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    now = {w: i.pid for w, i in ray.get(h.controller().ready.remote(), timeout=30).workers.items()}
    assert now == workers and all(_alive(p) for p in now.values())
    h.wait_idle(30)


def test_ingress_killed_its_slots_are_released(cluster):
    """SIGKILL the ingress replica's process with streams in flight: its lease runs out and the router
    frees their slots; Serve starts a new replica, which serves."""
    from pdcluster.actors.router import LEASE_TTL_S

    base = cluster[1]
    threads, outs = _streams_in_flight(base, 2, 120)
    (owner,) = [o for o, n in h.snapshot().leases.items() if n == 2]
    os.kill(int(owner.split("-")[1]), signal.SIGKILL)
    t0 = time.monotonic()
    h.wait_for(lambda: h.snapshot().in_flight == 0, timeout_s=LEASE_TTL_S + 15)
    assert time.monotonic() - t0 < LEASE_TTL_S + 15
    for t in threads:
        t.join(60)
    assert all(o[-1] != "[DONE]" for o in outs)  # cut off: their replica died
    assert owner not in h.snapshot().leases and h.snapshot().expired_total >= 2
    _served_within(base, 240)
    h.wait_idle(60)  # the workers finish and free the blocks


def _decode_stats() -> dict:
    (stats,) = [w.report.stats for w in h.snapshot().workers if w.info.role == "decode"]
    return stats


def test_master_killed_serving_continues_and_handoff_recovers(client, llm):
    """SIGKILL the mooncake_master mid-request: every answer stays the offline greedy one (decode
    recomputes what it cannot load), the supervisor restarts the master, and handoffs through the
    store resume (the store clients remount on their own)."""
    import os
    import signal
    import time

    import ray

    questions = [[{"role": "user", "content": f"Fact {i}: in one short sentence, describe the colour "
                                              f"of the sky at noon on a clear summer day."}]
                 for i in range(40)]
    offline = llm.generate([llm.chat_prompt(q) for q in questions],
                           SamplingParams(temperature=0, max_tokens=12))
    assert len(llm.chat_prompt(questions[0])) > 32  # at least two full KV blocks to hand off

    def ask(i: int) -> None:
        out = client.chat.completions.create(model=h.MODEL, messages=questions[i], temperature=0,
                                             max_tokens=12)
        assert out.choices[0].message.content == offline[i].text, i

    controller = h.controller()
    master = ray.get(controller.master_status.remote(), timeout=30)
    assert master.managed and master.healthy
    ask(0)
    before = h.wait_for(_decode_stats)
    stream = client.chat.completions.create(model=h.MODEL, messages=questions[1], temperature=0,
                                            max_tokens=12, stream=True)
    text = next(c.choices[0].delta.content for c in stream if c.choices[0].delta.content)
    os.kill(master.pid, signal.SIGKILL)  # mid-request: its first token is out, decode is running
    text += "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == offline[1].text

    # While the master is down (and its successor empty, the clients not yet remounted) decode
    # recomputes the prompts: keep asking until one was. Start once the store clients have seen the
    # loss (they ping about once a second): a put issued before that waits in Mooncake's ~4 s RPC
    # retry, which can outlast the restart and then succeed on the new master, leaving no fallback
    # to observe (seen once in a full-suite run).
    time.sleep(1.5)
    i, deadline = 2, time.monotonic() + 60
    while _decode_stats()["kv_recomputed_tokens"] == before["kv_recomputed_tokens"]:
        assert time.monotonic() < deadline, "no request fell back to recomputation"
        ask(i)
        i += 1
        time.sleep(0.5)  # one poll: the router's copy of the worker's counters is fresh
    status = h.wait_for(lambda: (s := ray.get(controller.master_status.remote(), timeout=30)).healthy
                        and s.restarts >= 1 and s, timeout_s=60)
    assert status.pid != master.pid

    # Handoff recovers: a new prompt's KV is loaded from the store again, not recomputed.
    deadline = time.monotonic() + 90
    while True:
        loaded, recomputed = _decode_stats()["kv_blocks_loaded"], _decode_stats()["kv_recomputed_tokens"]
        ask(i)
        i += 1
        time.sleep(0.6)
        now = _decode_stats()
        if now["kv_blocks_loaded"] > loaded and now["kv_recomputed_tokens"] == recomputed:
            break
        assert time.monotonic() < deadline and i < len(questions), "handoff did not recover"
    h.wait_idle()


# ---------------------------------------------------------------------------- tools
WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                  "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["tz"],
             "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}]
ASK_WEATHER = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def _check_calls(calls, names) -> None:
    import json

    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls and all(c["name"] in names for c in calls), calls
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), schemas[c["name"]])
    assert all(c["id"].startswith("call_") for c in calls) and len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_choice_return_valid_calls(client, choice):
    names = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    ask = {"model": h.MODEL, "messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": choice,
           "temperature": 0, "max_tokens": 80}
    full = client.chat.completions.create(**ask)
    msg = full.choices[0].message
    assert full.choices[0].finish_reason == "tool_calls", msg
    _check_calls([{"id": c.id, **c.function.model_dump()} for c in msg.tool_calls], names)

    streamed, finish = [], None
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice_ in chunk.choices:
            finish = choice_.finish_reason or finish
            for tc in choice_.delta.tool_calls or []:
                if tc.id:  # a new call: id and name first, then its arguments in fragments
                    assert tc.index == len(streamed) and tc.function.name
                    streamed.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
                streamed[tc.index]["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls"
    _check_calls(streamed, names)
    # the same greedy answer both ways (the ids aside)
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in msg.tool_calls]


def test_tool_results_go_back_to_the_model(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C, all three days."}]
    full = client.chat.completions.create(model=h.MODEL, messages=messages, tools=TOOLS,
                                          tool_choice="none", temperature=0, max_tokens=24)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.choices[0].message.content and not full.choices[0].message.tool_calls


RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]   # the Responses API's form


def test_responses_api_answers_as_the_engine_does_streamed_or_not(client, cluster, llm):
    instructions = "Answer in two sentences."
    messages = [{"role": "system", "content": instructions}, *QUESTION]
    offline = llm.generate([llm.chat_prompt(messages)], SamplingParams(temperature=0, max_tokens=40))[0]
    ask = {"model": h.MODEL, "instructions": instructions, "input": QUESTION[0]["content"],
           "temperature": 0, "max_output_tokens": 40}
    full = client.responses.create(**ask)
    assert full.output_text == offline.text
    assert full.status == ("incomplete" if offline.finish_reason == "length" else "completed")
    assert [(o.type, o.role) for o in full.output] == [("message", "assistant")]
    assert full.usage.output_tokens == len(offline.token_ids)
    assert full.usage.input_tokens == len(llm.chat_prompt(messages))
    assert full.id.startswith("resp_") and full.store is False

    events = list(client.responses.create(**ask, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                            "response.output_item.added", "response.content_part.added"]
    assert events[-1].type == f"response.{full.status}"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == offline.text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == len(offline.token_ids)

    count = client.responses.input_tokens.count(model=h.MODEL, instructions=instructions,
                                                input=QUESTION[0]["content"])
    assert count.input_tokens == full.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as missing:   # nothing is stored
        client.responses.retrieve(full.id)
    assert missing.value.body["code"] == "response_not_found"

    short = client.responses.create(**{**ask, "max_output_tokens": 5})
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert offline.text.startswith(short.output_text) and short.usage.output_tokens == 5
    metrics = httpx.get(cluster[1] + "/metrics").text
    assert 'code="200",route="/v1/responses"' in metrics

    # the raw body and events are what the server's OpenAPI document says
    components = httpx.get(cluster[1] + "/openapi.json").json()["components"]

    def check(model: str, value) -> None:
        jsonschema.validate(value, {"$ref": f"#/components/schemas/{model}", "components": components})

    check("Response", httpx.post(cluster[1] + "/v1/responses", json=ask, timeout=120).json())
    with httpx.stream("POST", cluster[1] + "/v1/responses", json={**ask, "stream": True}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert names == [d["type"] for d in datas] and len(datas) == len(events)
    for data in datas:
        check("ResponseEvent", data)


def test_responses_api_function_calls_and_their_outputs(client):
    ask = {"model": h.MODEL, "input": ASK_WEATHER, "tools": RESPONSES_TOOLS, "tool_choice": "required",
           "temperature": 0, "max_output_tokens": 80}
    full = client.responses.create(**ask)
    calls = [o for o in full.output if o.type == "function_call"]
    _check_calls([{"id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
                 {"get_weather", "get_time"})
    chat = client.chat.completions.create(model=h.MODEL, messages=ASK_WEATHER, tools=TOOLS,
                                          tool_choice="required", temperature=0, max_tokens=80)
    assert [(c.name, c.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in chat.choices[0].message.tool_calls]

    streamed: dict[str, str] = {}
    for e in client.responses.create(**ask, stream=True):
        if e.type == "response.function_call_arguments.delta":
            streamed[e.item_id] = streamed.get(e.item_id, "") + e.delta
        if e.type == "response.output_item.done" and e.item.type == "function_call":
            assert streamed[e.item.id] == e.item.arguments
    assert list(streamed.values()) == [c.arguments for c in calls]

    # the calls and their outputs go back: the answer is chat's to the same conversation
    result = "Sunny, 21 C, all three days."
    follow = client.responses.create(
        model=h.MODEL, tools=RESPONSES_TOOLS, tool_choice="none", temperature=0, max_output_tokens=24,
        input=[*ASK_WEATHER, *(c.model_dump(exclude_none=True) for c in calls),
               *({"type": "function_call_output", "call_id": c.call_id, "output": result} for c in calls)])
    chat_follow = client.chat.completions.create(
        model=h.MODEL, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24,
        messages=[*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]}, *({"role": "tool", "tool_call_id": c.call_id, "content": result} for c in calls)])
    assert follow.output_text and follow.output_text == chat_follow.choices[0].message.content


def test_responses_api_logprobs_structured_output_and_refusals(client):
    ask = {"model": h.MODEL, "input": "Name a colour.", "temperature": 0, "max_output_tokens": 6}
    got = client.responses.create(**ask, include=["message.output_text.logprobs"], top_logprobs=2)
    chat = client.chat.completions.create(model=h.MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                          temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    lps, want = got.output[0].content[0].logprobs, chat.choices[0].logprobs.content
    assert [lp.token for lp in lps] == [c.token for c in want] and len(lps) == 6
    # the same values up to float noise: one prompt's KV is computed, the other's comes from the
    # prefix cache, in batches of other shapes
    assert [lp.logprob for lp in lps] == pytest.approx([c.logprob for c in want], abs=2e-3)
    assert all(len(lp.top_logprobs) == 2 for lp in lps)

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    person = client.responses.create(model=h.MODEL, input="Describe a person as JSON.", temperature=0,
                                     max_output_tokens=80, text={"format": {
                                         "type": "json_schema", "name": "person", "schema": schema,
                                         "strict": True}})
    jsonschema.validate(json.loads(person.output_text), schema)

    for extra, param in [({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
                         ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
                         ({"max_output_tokens": 0}, "max_output_tokens")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(**{**ask, **extra})
        assert info.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.responses.create(**{**ask, "model": "no-such-model"})


def test_an_openai_agents_sdk_agent_calls_a_tool_over_either_api(cluster):
    # OpenAI's Agents SDK as a user's agent runs it: a function tool called with the arguments the
    # model wrote and its result handed back, then a plain answer streamed, over the Responses API
    # (the SDK's default) and over Chat Completions
    import asyncio

    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)

    set_tracing_disabled(True)

    async def run(model) -> tuple[str, list[str], str, str]:
        calls: list[str] = []

        @function_tool
        def get_weather(city: str) -> str:
            """Weather forecast for a city."""
            calls.append(city)
            return f"Sunny, 21 C in {city}."

        tool_user = Agent(name="weather", instructions="Use the tools.", model=model, tools=[get_weather],
                          tool_use_behavior="stop_on_first_tool", model_settings=ModelSettings(
                              tool_choice="required", parallel_tool_calls=False, temperature=0,
                              max_tokens=200))
        ran = await Runner.run(tool_user, "What is the weather in Paris?")
        assistant = Agent(name="assistant", instructions="You are a helpful assistant.", model=model,
                          model_settings=ModelSettings(temperature=0, max_tokens=120))
        streamed = Runner.run_streamed(assistant, "What is the capital of France?")
        deltas = [e.data.delta async for e in streamed.stream_events() if e.type == "raw_response_event"
                  and getattr(e.data, "type", "") == "response.output_text.delta"]
        return ran.final_output, calls, streamed.final_output, "".join(deltas)

    async def both() -> dict[str, tuple[str, list[str], str, str]]:
        client = openai.AsyncOpenAI(base_url=cluster[1] + "/v1", api_key="unused", max_retries=0)
        return {"responses": await run(OpenAIResponsesModel(h.MODEL, client)),
                "chat": await run(OpenAIChatCompletionsModel(h.MODEL, client))}

    results = asyncio.run(both())
    for api, (final, calls, answer, deltas) in results.items():
        assert len(calls) == 1 and calls[0].strip(), (api, calls)
        assert final == f"Sunny, 21 C in {calls[0]}.", (api, final)
        assert answer and deltas == answer, (api, answer, deltas)
    assert results["responses"][2] == results["chat"][2]   # the same greedy answer either way


def test_grpc_named_tool_choice_streams_the_same_call(client, cluster):
    import json

    from pdcluster.proto import inference_pb2 as pb
    from pdcluster.proto import inference_pb2_grpc as pb_grpc

    named = {"type": "function", "function": {"name": "get_weather"}}
    http = client.chat.completions.create(model=h.MODEL, messages=ASK_WEATHER, tools=TOOLS, tool_choice=named,
                                          temperature=0, max_tokens=80).choices[0].message.tool_calls
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in ASK_WEATHER],
        tools_json=json.dumps(TOOLS), tool_choice_json=json.dumps(named), max_tokens=80, temperature=0)
    with grpc.insecure_channel(f"127.0.0.1:{cluster[0].serve.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        msgs = list(stub.Generate(request, timeout=120))
        calls = [c for m in msgs for c in m.tool_calls]
        assert calls[0].id.startswith("call_") and calls[0].name == "get_weather"
        assert {c.index for c in calls} == {0} and not any(c.name for c in calls[1:])
        assert "".join(c.arguments for c in calls) == http[0].function.arguments
        assert msgs[-1].finish_reason == "tool_calls"
        request.tools_json = "[{"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in err.value.details()


def test_redeploy_with_a_changed_router_setting_takes_effect_without_a_reload(cluster):
    """Deploy the same cluster again, as `pdcluster up`/`serve deploy`/a KubeRay serveConfigV2 update
    do, with one admitted request and no queue: the new ingress replica reconfigures the running
    router (same process, same workers: no reload) and a second concurrent request gets a 429. Last
    in this module: the cluster keeps the new spec."""
    import ray
    from pdcluster.cluster.launch.deployment import deploy
    from pdcluster.cluster.spec import SpecChangeRefused
    from pdcluster.proto import inference_pb2 as pb
    from pdcluster.proto import inference_pb2_grpc as pb_grpc

    spec, base = cluster
    router_pid = ray.get(h.router().pid.remote(), timeout=30)
    workers = {w: i.pid for w, i in ray.get(h.controller().ready.remote(), timeout=30).workers.items()}
    reload = spec.model_copy(update={"engine": spec.engine.model_copy(update={"max_num_seqs": 3})})
    with pytest.raises(SpecChangeRefused, match="engine.max_num_seqs"):
        deploy(reload, timeout_s=60)  # refused before Serve stops the replica that serves
    new = spec.model_copy(update={"router": spec.router.model_copy(
        update={"max_concurrency": 1, "max_queue": 0})})
    deploy(new, timeout_s=300)
    assert ray.get(h.controller().spec_dict.remote(), timeout=30) == new.to_dict()
    threads, outs = _streams_in_flight(base, 1, 120)
    r = httpx.post(base + "/v1/completions", timeout=60, json={"model": h.MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    assert r.json()["error"]["type"] and h.snapshot().rejected_total.get("queue_full", 0) >= 1
    threads[0].join(180)
    assert outs[0][0] == 200 and outs[0][-1] == "[DONE]", outs[0][-3:]
    assert _served_within(base, 30) < 30
    with grpc.insecure_channel(f"127.0.0.1:{spec.serve.grpc_port}") as channel:  # the new replica's
        msgs = list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2),
                                                             timeout=60))
        assert msgs[-1].finish_reason == "length"
    assert ray.get(h.router().pid.remote(), timeout=30) == router_pid
    assert {w: i.pid for w, i in ray.get(h.controller().ready.remote(), timeout=30).workers.items()} == workers
