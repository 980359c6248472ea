"""Benchmark client for any OpenAI-compatible endpoint (completions, chat completions or the Responses
API): closed-loop concurrency sweep with streaming, random prompts of an exact token count,
evalscope-style report (Markdown, JSON, plot).

Several endpoints (e.g. PD vs colocated vs llama.cpp) run level by level in one process, so ratios
hold on a noisy machine. The client does as little as it can per chunk (a timestamp and a JSON
parse; tokens are counted from the server's usage at the end), because on a small machine its CPU
is taken from the server it measures.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from .perf_metrics import (
    LevelStats,
    RequestTrace,
    format_comparison,
    format_table,
    largest_concurrency_meeting_tps,
    levels_to_json,
    summarize,
)

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]

# Common English words: nearly all are one token (with their leading space) in BPE and SentencePiece
# vocabularies, so a prompt's token count is easy to steer; random sequences of them never share a
# first KV block, so prefix caches do not flatter the numbers.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education foot boy age policy music market "
    "sense nation plan college interest death experience effect class control care field development "
    "role effort rate heart drug show leader light voice wife police mind price report decision "
    "son view relationship town road arm difference value building action model season society "
    "tax director position player record paper space ground form event official matter center couple "
    "site project activity star table need court oil situation cost industry figure street image"
).split()
_FILLERS = ("a", "I", "the", "and", "of", "to", "in", "is", "it", "on", "at", "or", "be", "we", "he")


def token_counter(tokenizer: Any) -> TokenCounter:
    """A token counter from a Hugging Face tokenizer (`encode`), or a callable returning token ids or
    a count. Special tokens (BOS) are not counted: the prompt text itself has exactly n tokens."""
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if not callable(tokenizer):
        raise TypeError(f"need a tokenizer with encode() or a callable, got {type(tokenizer).__name__}")

    def count(text: str) -> int:
        out = tokenizer(text)
        return out if isinstance(out, int) else len(out)
    return count


def make_prompt(count: TokenCounter, n_tokens: int, rng: random.Random) -> str:
    """Random words measuring exactly `n_tokens` tokens with `count`."""
    if n_tokens < 1:
        raise ValueError("n_tokens must be >= 1")
    words = [rng.choice(_WORDS) for _ in range(n_tokens)]
    while count(" ".join(words)) < n_tokens:
        words += [rng.choice(_WORDS) for _ in range(n_tokens)]
    # Longest prefix of words that fits (a word-prefix's count grows with its length).
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    have = count(text) if text else 0
    while have < n_tokens:  # top up one short word at a time
        for filler in rng.sample(_FILLERS, len(_FILLERS)):
            candidate = f"{text} {filler}" if text else filler
            if count(candidate) == have + 1:
                text, have = candidate, have + 1
                break
        else:
            raise ValueError(f"cannot build a prompt of exactly {n_tokens} tokens with this tokenizer")
    return text


def quiet_http_logs() -> None:
    """httpx logs every request at INFO ("HTTP Request: POST ..."): keep a sweep's console readable."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_url: str  # http://host:port or http://host:port/v1

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """NAME=URL, as given on a command line."""
        name, sep, url = text.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"expected NAME=URL, got {text!r}")
        return cls(name, url)

    def url(self, api: str = "completions") -> str:
        """The URL of `api` ("completions", "chat" or "responses"): /v1/completions,
        /v1/chat/completions or /v1/responses."""
        path = {"completions": "completions", "chat": "chat/completions", "responses": "responses"}[api]
        base = self.base_url.rstrip("/")
        return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"

    @property
    def completions_url(self) -> str:
        return self.url("completions")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    input_len: int = 128
    output_len: int = 128
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    requests_per_level: int | None = None  # default: waves x concurrency, at least min_requests
    waves: int = 4
    min_requests: int = 1
    # or "chat": /v1/chat/completions, the prompt as one user message; or "responses": /v1/responses
    # (OpenAI's Responses API), the prompt as its input
    api: str = "completions"
    temperature: float = 0.0  # greedy, as evalscope's runs are; servers default to sampling at 1.0
    # sent only when set: a server's own defaults (or its refusal of the field) otherwise
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    warmup_requests: int = 0  # per endpoint before its first level, not measured
    api_key: str | None = None
    slo_ttft_s: float | None = None
    slo_tpot_ms: float | None = None
    timeout_s: float = 600.0
    # None: fresh prompts every run, as evalscope's random dataset; a fixed seed repeats a run's prompts,
    # which a server's prefix cache then serves from the last run
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")

    def requests_at(self, concurrency: int) -> int:
        return self.requests_per_level or max(self.min_requests, self.waves * concurrency)

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": self.output_len, "temperature": self.temperature,
            "ignore_eos": True,  # vLLM-style servers then produce exactly max_tokens
            "stream": True, "stream_options": {"include_usage": True}}
        body.update({k: v for k, v in (("top_p", self.top_p), ("top_k", self.top_k), ("min_p", self.min_p))
                     if v is not None})
        if self.api == "responses":   # its usage comes with its last event
            del body["stream_options"]
            body["max_output_tokens"] = body.pop("max_tokens")
            body["input"] = prompt
        elif self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body


APIS = ("completions", "chat", "responses")
# the Responses API's events: those that carry text, and those that end the stream
_RESPONSE_TEXT = frozenset({"response.output_text.delta", "response.reasoning_text.delta"})
_RESPONSE_END = frozenset({"response.completed", "response.incomplete"})


def _has_text(chunk: dict[str, Any]) -> bool:
    if chunk.get("type") in _RESPONSE_TEXT:
        return bool(chunk.get("delta"))
    for c in chunk.get("choices") or ():
        delta = c.get("delta")
        if c.get("text") or (delta and (delta.get("content") or delta.get("reasoning_content"))):
            return True
    return False


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                            headers: dict[str, str], prompt_tokens: int) -> RequestTrace:
    """One streamed completion: a timestamp per SSE chunk that carries text; the response ends at its
    last JSON chunk (the usage), as evalscope times it."""
    start = last = time.perf_counter()
    times: list[float] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:200]
                return RequestTrace(start, [], prompt_tokens, ok=False, error=f"HTTP {resp.status_code}: {detail}",
                                    end=time.perf_counter())
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                last = now
                kind = chunk.get("type")
                if chunk.get("error") or kind in ("error", "response.failed"):
                    error = chunk.get("error") or (chunk.get("response") or {}).get("error") or chunk
                    return RequestTrace(start, times, prompt_tokens, ok=False, error=str(error)[:200],
                                        end=now)
                if _has_text(chunk):
                    times.append(now)
                if kind in _RESPONSE_END:   # the Responses API's last event, with its usage
                    use = chunk["response"].get("usage") or {}
                    usage = {"prompt_tokens": use.get("input_tokens"),
                             "completion_tokens": use.get("output_tokens")}
                    break
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestTrace(start, times, prompt_tokens, ok=False, error=f"{type(e).__name__}: {e}",
                            end=time.perf_counter())
    if not times:
        return RequestTrace(start, [], prompt_tokens, ok=False, error="no tokens streamed", end=time.perf_counter())
    return RequestTrace(start, times, usage.get("prompt_tokens", prompt_tokens), ok=True,
                        output_tokens=usage.get("completion_tokens"), end=last)


async def run_level(client: httpx.AsyncClient, endpoint: Endpoint, cfg: BenchConfig, concurrency: int,
                    prompts: Sequence[str], on_done: Callable[[], None] = lambda: None) -> list[RequestTrace]:
    """Closed loop: `concurrency` workers each send the next prompt as soon as their last one ends."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    traces: list[RequestTrace] = []
    todo = iter(prompts)

    async def worker() -> None:
        for prompt in todo:  # one iterator shared by all workers
            traces.append(await stream_completion(client, endpoint.url(cfg.api), cfg.body(prompt), headers,
                                                  cfg.input_len))
            on_done()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return traces


class _Progress:
    """tqdm when installed, else a log line every 10%."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="req", leave=False)
            except ImportError:
                pass
        self._plain = enabled and self._bar is None

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update()
        elif self._plain and (self.n * 10 // self.total) != ((self.n - 1) * 10 // self.total):
            log.info("%s: %d/%d requests", self.desc, self.n, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_sweep(cfg: BenchConfig, endpoints: Sequence[Endpoint], count: TokenCounter,
                    progress: bool = True) -> dict[str, list[LevelStats]]:
    """Every concurrency level against every endpoint (endpoints alternate level by level); returns
    endpoint name -> one LevelStats per level. Each endpoint gets prompts of its own, of the same
    lengths: two endpoints that share a prefix cache (two ports of one server, two deployments on
    one store) must not serve each other's prompts from it."""
    rng = random.Random(cfg.seed)
    results: dict[str, list[LevelStats]] = {e.name: [] for e in endpoints}
    limits = httpx.Limits(max_connections=max(cfg.concurrency), max_keepalive_connections=max(cfg.concurrency))
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        if cfg.warmup_requests:
            for ep in endpoints:
                warm = [make_prompt(count, cfg.input_len, rng) for _ in range(cfg.warmup_requests)]
                await run_level(client, ep, cfg, len(warm), warm)
        for conc in cfg.concurrency:
            for ep in endpoints:
                prompts = [make_prompt(count, cfg.input_len, rng) for _ in range(cfg.requests_at(conc))]
                bar = _Progress(len(prompts), f"{ep.name} c={conc}", progress)
                traces = await run_level(client, ep, cfg, conc, prompts, bar.update)
                bar.close()
                stats = summarize(traces, conc, cfg.slo_ttft_s, cfg.slo_tpot_ms)
                if stats.ok < stats.requests:
                    errors = sorted({t.error or "" for t in traces if not t.ok})
                    log.warning("%s c=%d: %d/%d requests failed: %s", ep.name, conc,
                                stats.requests - stats.ok, stats.requests, "; ".join(errors)[:300])
                results[ep.name].append(stats)
    return results


def render_markdown(cfg: BenchConfig, results: dict[str, list[LevelStats]], min_tps: float | None = None) -> str:
    parts = []
    for name, levels in results.items():
        parts.append(format_table(levels, title=f"{name}: {cfg.model}, {cfg.input_len} in / {cfg.output_len} out"))
        if min_tps is not None:
            best = largest_concurrency_meeting_tps(levels, min_tps)
            parts.append(f"Largest concurrency with per-request TPS >= {min_tps:g}: {best}")
    if len(results) > 1:
        parts.append("### Comparison\n\n" + format_comparison(results))
    return "\n\n".join(parts) + "\n"


def write_report(out_dir: Path, cfg: BenchConfig, endpoints: Sequence[Endpoint],
                 results: dict[str, list[LevelStats]], min_tps: float | None = None) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
           "endpoints": {e.name: e.base_url for e in endpoints},
           "levels": {name: levels_to_json(levels) for name, levels in results.items()}}
    if min_tps is not None:
        doc["min_tps"] = min_tps
        doc["largest_concurrency_meeting_tps"] = {
            name: largest_concurrency_meeting_tps(levels, min_tps) for name, levels in results.items()}
    paths = [out_dir / "bench.json", out_dir / "bench.md"]
    paths[0].write_text(json.dumps(doc, indent=2))
    paths[1].write_text(render_markdown(cfg, results, min_tps))
    png = out_dir / "bench.png"
    if plot(results, png, min_tps):
        paths.append(png)
    return paths


def plot(results: dict[str, list[LevelStats]], path: Path, min_tps: float | None = None) -> bool:
    """Per-request TPS and system throughput against concurrency; False (and a warning) if matplotlib,
    a dependency of the package, cannot be imported."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log.warning("no plot: %s", e)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in results.items():
        conc = [lv.concurrency for lv in levels]
        ax1.plot(conc, [lv.tps for lv in levels], marker="o", label=name)
        ax2.plot(conc, [lv.throughput_tok_s for lv in levels], marker="o", label=name)
    if min_tps is not None:
        ax1.axhline(min_tps, color="grey", linestyle="--", label=f"{min_tps:g} tok/s")
    ticks = sorted({lv.concurrency for levels in results.values() for lv in levels})
    for ax, ylabel in ((ax1, "per-request tokens/s"), (ax2, "system output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
