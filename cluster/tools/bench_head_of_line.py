"""Time to first token of short requests sent while a long prompt is being prefilled, beside the
same kind of short requests sent alone, against one OpenAI endpoint (ours or any other): how long
a short request queues behind a long prompt, as a ratio. The long request's own latency is timed
alone and with the short requests beside it (what letting them in costs it).

    python -m pdcluster.cluster.tools.bench_head_of_line [--base-url http://127.0.0.1:8000]
        [--long-tokens 6000] [--shorts 3] [--delay-s 4]

Every request gets a prompt of its own (random words, exact token counts with the embedded model's
tokenizer), so no phase is served from another's prefix cache; the short ones run one after the
other, greedy, streamed.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from dataclasses import dataclass

import httpx

from .bench_client import (Endpoint, TokenCounter, make_prompt, quiet_http_logs, stream_completion,
                           token_counter)

SHORT_TOKENS = 16
SHORT_OUTPUT = 8
LONG_OUTPUT = 4


@dataclass(frozen=True)
class HeadOfLine:
    short_alone_ttft_s: list[float]
    short_behind_ttft_s: list[float]  # each sent while the long prompt was being prefilled
    long_alone_s: float | None        # None: not measured
    long_with_shorts_s: float
    long_tokens: int


async def _request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                   headers: dict[str, str]) -> tuple[float, float]:
    """(time to first token, latency) of one greedy streamed chat request; raises if it failed."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    trace = await stream_completion(client, url, body, headers, 0)
    if not trace.ok:
        raise RuntimeError(f"request failed: {trace.error}")
    return trace.ttft, (trace.end or trace.token_times[-1]) - trace.start


async def measure(endpoint: Endpoint, model: str, count: TokenCounter, long_tokens: int = 6000,
                  shorts: int = 3, delay_s: float = 4.0, api_key: str | None = None,
                  long_alone: bool = True, seed: int | None = None) -> HeadOfLine:
    rng = random.Random(seed)
    url = endpoint.url("chat")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def prompt(n: int) -> str:
        return make_prompt(count, n, rng)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        await _request(client, url, model, prompt(SHORT_TOKENS), SHORT_OUTPUT, headers)  # warm-up
        alone = [(await _request(client, url, model, prompt(SHORT_TOKENS), SHORT_OUTPUT, headers))[0]
                 for _ in range(shorts)]
        long_alone_s = None
        if long_alone:
            long_alone_s = (await _request(client, url, model, prompt(long_tokens), LONG_OUTPUT, headers))[1]
        long = asyncio.ensure_future(_request(client, url, model, prompt(long_tokens), LONG_OUTPUT, headers))
        await asyncio.sleep(delay_s)
        behind = []
        for _ in range(shorts):
            if long.done():
                break  # the long prompt is done: what follows no longer queues behind it
            behind.append((await _request(client, url, model, prompt(SHORT_TOKENS), SHORT_OUTPUT,
                                          headers))[0])
        long_with_s = (await long)[1]
    return HeadOfLine(alone, behind, long_alone_s, long_with_s, long_tokens)


def format_result(name: str, r: HeadOfLine) -> str:
    alone = statistics.median(r.short_alone_ttft_s)
    lines = [f"{name}: short requests' TTFT alone (median of {len(r.short_alone_ttft_s)}): {alone:.3f} s"]
    if r.short_behind_ttft_s:
        each = " / ".join(f"{t:.2f}" for t in r.short_behind_ttft_s)
        worst = max(r.short_behind_ttft_s)
        lines.append(f"behind a {r.long_tokens}-token prompt being prefilled: {each} s "
                     f"(worst {worst / alone:.1f}x alone)")
    else:
        lines.append("the long prompt finished before any short request was sent: raise --long-tokens")
    long = f"long request: {r.long_with_shorts_s:.1f} s with the short requests"
    if r.long_alone_s:
        long += f", {r.long_alone_s:.1f} s alone ({r.long_with_shorts_s / r.long_alone_s:.2f}x)"
    lines.append(long)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..cli.bench import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--name", default="pdcluster", help="label of the endpoint in the report")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--api-key")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the embedded model's)")
    ap.add_argument("--long-tokens", type=int, default=6000)
    ap.add_argument("--shorts", type=int, default=3)
    ap.add_argument("--delay-s", type=float, default=4.0, help="from the long request to the first short")
    ap.add_argument("--no-long-alone", action="store_true", help="skip timing the long request alone")
    args = ap.parse_args(argv)
    quiet_http_logs()
    count = token_counter(load_tokenizer(args.tokenizer))
    try:
        result = asyncio.run(measure(Endpoint(args.name, args.base_url), args.model, count,
                                     args.long_tokens, args.shorts, args.delay_s, args.api_key,
                                     not args.no_long_alone))
    except RuntimeError as exc:
        print(f"bench_head_of_line: {exc}", file=sys.stderr)
        return 1
    print(format_result(args.name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
