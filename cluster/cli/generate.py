"""`pdcluster generate`: run the engine in this process on a prompt (no Ray, no server)."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text in-process with the engine")
    p.add_argument("--prompt", required=True, help="user message (chat template applied)")
    p.add_argument("--model", default="embedded", help="'embedded', a .gguf file or an HF folder")
    p.add_argument("--raw", action="store_true", help="complete the prompt as raw text, no chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...engine import LLM, SamplingParams
    llm = LLM(args.model, device=args.device)
    if args.raw:
        prompt = llm.tokenizer.encode(args.prompt)
    else:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    eng = llm.engine
    eng.add_request("cli", prompt_token_ids=prompt, params=params)
    while eng.has_unfinished_requests():
        for out in eng.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
