"""Serving metrics: per-worker engine histograms and the LOADING gauge from the router's snapshot, and
HTTP responses by route and code, as /metrics exports them."""
from __future__ import annotations

from types import SimpleNamespace

from pdcluster.cluster.serve import metric_names as mn
from pdcluster.cluster.serve.metrics import ServingMetrics
from pdcluster.engine.latency_histogram import LatencyHistogram
from prometheus_client.parser import text_string_to_metric_families


def worker(wid: str, role: str, stats: dict) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(worker_id=wid, role=role),
                           report=SimpleNamespace(running_seqs=1, free_blocks=2, stats=stats))


def histogram(*seconds: float) -> dict:
    h = LatencyHistogram()
    for s in seconds:
        h.observe(s)
    return h.snapshot()


def test_step_time_kv_wait_and_loading_requests_per_worker():
    metrics = ServingMetrics()
    decode = {"step_seconds": histogram(0.004, 0.02, 0.02, 0.3), "kv_wait_seconds": histogram(1.5),
              "num_loading_kv": 2, "step_thread_seconds_total": 0.6}
    prefill = {"step_seconds": histogram(0.2), "kv_wait_seconds": histogram(), "num_loading_kv": 0}
    metrics.set_cluster(SimpleNamespace(queued=0, in_flight=3, workers=[
        worker("d0", "decode", decode), worker("p0", "prefill", prefill),
        worker("old", "decode", {})]))                 # a worker that reports none of them
    text = metrics.render().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, wid: str, role: str, **extra: str) -> float:
        return samples[(name, tuple(sorted({"worker": wid, "role": role, **extra}.items())))]

    step = mn.WORKER_STEP_SECONDS
    assert f'# TYPE {step} histogram' in text
    # cumulative buckets: 0.004 <= 0.005; two 0.02s <= 0.025; 0.3 <= 0.5
    assert value(step + "_bucket", "d0", "decode", le="0.005") == 1
    assert value(step + "_bucket", "d0", "decode", le="0.025") == 3
    assert value(step + "_bucket", "d0", "decode", le="0.25") == 3
    assert value(step + "_bucket", "d0", "decode", le="0.5") == 4
    assert value(step + "_bucket", "d0", "decode", le="+Inf") == 4
    assert value(step + "_count", "d0", "decode") == 4
    assert abs(value(step + "_sum", "d0", "decode") - 0.344) < 1e-9
    assert value(step + "_count", "p0", "prefill") == 1
    wait = mn.KV_WAIT_SECONDS
    assert value(wait + "_bucket", "d0", "decode", le="1.0") == 0
    assert value(wait + "_bucket", "d0", "decode", le="2.5") == 1
    assert value(wait + "_sum", "d0", "decode") == 1.5
    assert value(wait + "_count", "p0", "prefill") == 0
    assert value(mn.KV_LOADING_REQUESTS, "d0", "decode") == 2
    assert value(mn.KV_LOADING_REQUESTS, "p0", "prefill") == 0
    assert value(mn.KV_LOADING_REQUESTS, "old", "decode") == 0
    threads = mn.WORKER_STEP_THREAD_SECONDS_TOTAL
    assert f"# TYPE {threads} counter" in text
    assert value(threads, "d0", "decode") == 0.6 and value(threads, "p0", "prefill") == 0
    assert 'worker="old"' not in "\n".join(line for line in text.splitlines()
                                           if line.startswith((step, wait)))


def test_the_engine_counts_step_time_times_its_threads(llm):
    from pdcluster.engine.sampling import SamplingParams

    engine = llm.engine
    original, before = engine.threads, engine.stats()
    engine.set_threads(1)
    try:
        llm.generate(["The sea is"], SamplingParams(max_tokens=6, temperature=0))
        middle = engine.stats()
        engine.set_threads(2)
        llm.generate(["The sea is"], SamplingParams(max_tokens=6, temperature=0))
        after = engine.stats()
    finally:
        engine.set_threads(original)
    one = middle.step_seconds["sum"] - before.step_seconds["sum"]
    two = after.step_seconds["sum"] - middle.step_seconds["sum"]
    assert one > 0 and two > 0
    assert abs((middle.step_thread_seconds_total - before.step_thread_seconds_total) - one) < 1e-9
    assert abs((after.step_thread_seconds_total - middle.step_thread_seconds_total) - 2 * two) < 1e-9


def test_http_responses_are_counted_by_route_and_code_errors_included():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.testclient import TestClient
    from pdcluster.cluster.serve.metrics import CountResponses

    app = FastAPI()
    app.add_middleware(CountResponses)

    @app.post("/v1/completions")
    async def completions():
        return JSONResponse({"error": {}}, status_code=400)

    @app.post("/v1/chat/completions")
    async def chat():
        async def body():
            yield "data: 1\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        raise RuntimeError("boom")

    def counts() -> dict[tuple, float]:
        text = ServingMetrics().render().decode()
        return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == mn.HTTP_RESPONSES_TOTAL}

    before = counts()
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/completions").status_code == 400
        assert client.post("/v1/chat/completions").status_code == 200
        assert client.get("/health").status_code == 500
        for path in ("/a", "/b", "/wp-login.php"):   # any other path: one label, not one each
            assert client.get(path).status_code == 404
    after = counts()
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert moved == {(("code", "400"), ("route", "/v1/completions")): 1,
                     (("code", "200"), ("route", "/v1/chat/completions")): 1,
                     (("code", "500"), ("route", "/health")): 1,
                     (("code", "404"), ("route", "other")): 3}
