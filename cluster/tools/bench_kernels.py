"""The CPU kernels next to the torch paths they replace, on the embedded model's own layers, one run;
then the engine's decode step with a float16 and a bfloat16 KV cache next to the float32 one, with
all layers in one C call next to the layers' modules, and with int16 and int8 activations next to
float32 ones; with --against, the matmul and attention kernels next to those of another git revision.

    python -m pdcluster.cluster.tools.bench_kernels [--rows 1 8 32] [--context 192] [--repeats 20]
        [--parts kernels kv-dtypes decode-step activations] [--against REV]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Matmuls: every projection and the LM head of the loaded model, through the block kernel (GGUF
# Q4_1/Q8_0 blocks, float32 activations) and through BLAS on the dense float32 weight (`F.linear`),
# per decode batch size.
# Decode attention: one step's attention over all layers for 32 sequences of `--context` tokens, the
# compiled kernel against the torch gather + SDPA path. Small ops: one decode step's RMSNorms, rotary,
# SiLU-and-mul and KV writes over all layers, the fused C kernels against the torch ops they replace.
# Times are the best of `--repeats` passes, each pass timing both sides back to back.
# The engines below have the default matmul_activations (auto: int16 here, with VNNI).
# KV cache dtypes: three engines (float32, float16, bfloat16 caches), each with `--rows` sequences of
# `--context` prompt tokens decoding; their steps are taken in turn, and the median step of each is
# compared with the float32 engine's.
# Decode step in one call: one engine with `--rows` sequences decoding; its steps alternate between
# all layers in one C call (engine/models/llama_decode_step.py) and the layers' modules (the same
# kernels called one by one from Python), and the median step of each is compared.
# Activations (matmul_activations): all the model's matmuls through the integer kernel with int16 and
# int8 activations and through the float one, per `--rows` and at 512 rows (a prefill chunk), with
# each one's error relative to the float outputs; then three engines (float32, int16, int8) decoding
# `--rows` sequences in turn (median steps), and prefilling one 512-token prompt in turn (best of 3).
# Against a revision: csrc/block_linear.c and csrc/paged_decode_attention.c as they were at REV,
# compiled beside this tree's, multiply and attend on the same inputs (all the model's matmuls per
# `--rows`; decode attention over `--context`-token contexts, and one 2048-token context beside four
# of `--context`), timed alternately; each pair's outputs are compared bit for bit.


def _paired(ours, ref, repeats: int) -> tuple[float, float]:
    """Best seconds of each, timed alternately so a slow spell of the machine hits both."""
    ours(), ref()   # warm up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, ref)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def _matmuls(model, rows: list[int], repeats: int) -> list[tuple[str, float, float]]:
    from ...engine.layers.cpu_linear import BlockLinearMethod
    layers = [m for m in model.modules() if isinstance(getattr(m, "method", None), BlockLinearMethod)]
    if not layers:
        raise SystemExit("no layer runs on the block kernel here (no compiler, or "
                         "PDCLUSTER_CPU_KERNELS=0)")
    dense = [m.rows.weight if hasattr(m, "rows") else m.weight for m in layers]   # LM head: rows
    out = []
    for r in rows:
        xs = [torch.randn(r, w.shape[1]) for w in dense]
        ours = lambda: [m.method.kernel(m.method.blocks, x) for m, x in zip(layers, xs)]  # noqa: E731
        blas = lambda: [F.linear(x, w) for w, x in zip(dense, xs)]  # noqa: E731
        out.append((f"all {len(layers)} matmuls, {r} rows", *_paired(ours, blas, repeats)))
    return out


def _attention(model, context: int, repeats: int, cache_dtype: torch.dtype = torch.float32
               ) -> tuple[str, float, float]:
    from ...engine.cpu_kernels import paged_decode_kernel
    from ...engine.layers import attention
    from ...engine.layers.attention import AttentionMetadata, paged_attention
    if paged_decode_kernel() is None:
        raise SystemExit("the decode-attention kernel is not built here")
    seqs, block = 32, 16
    num_layers = model.num_layers
    _, kv_heads, head_dim = model.kv_token_shape
    heads = model.model.layers[0].self_attn.num_heads
    width = -(-context // block)
    cache = torch.randn(seqs * width + 1, num_layers, block, 2, kv_heads, head_dim).to(cache_dtype)
    tables = torch.randperm(seqs * width).view(seqs, width)
    lens = torch.full((seqs,), context)
    last = lens - 1
    meta = AttentionMetadata(
        slot_blocks=tables[torch.arange(seqs), last // block], slot_offsets=last % block,
        num_decode=seqs, decode_block_tables=tables,
        decode_mask=(torch.arange(width * block)[None, :] < lens[:, None])[:, None, None, :],
        decode_lens=lens)
    q = torch.randn(seqs, heads, head_dim)
    k = torch.randn(seqs, kv_heads, head_dim)
    v = torch.randn(seqs, kv_heads, head_dim)
    scale = head_dim ** -0.5

    def step():
        for layer in range(num_layers):
            paged_attention(q, k, v, cache, layer, meta, scale)

    kernel = attention.paged_decode_kernel

    def torch_step():
        attention.paged_decode_kernel = lambda: None
        try:
            step()
        finally:
            attention.paged_decode_kernel = kernel

    return (f"decode attention, {seqs} seqs x {context} tokens, {str(cache_dtype)[6:]}",
            *_paired(step, torch_step, repeats))


def _source_at(rev: str, name: str, folder: Path) -> Path:
    """engine/csrc/<name>.c as it was at git revision `rev`, written into `folder`."""
    repo = Path(__file__).resolve().parents[2]
    try:
        text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:engine/csrc/{name}.c"],
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"--against needs a git checkout with revision {rev!r}: {exc}") from exc
    path = folder / f"{name}.c"
    path.write_bytes(text)
    return path


def _against(model, rev: str, rows: list[int], context: int, repeats: int
             ) -> list[tuple[str, float, float, bool]]:
    """(measure, this tree's seconds, REV's seconds, outputs equal bit for bit) per measure."""
    from ...engine import cpu_kernels
    from ...engine.cpu_kernels import BlockLinearKernel, PagedDecodeKernel
    from ...engine.layers.cpu_linear import BlockLinearMethod
    ours_mm, ours_attn = cpu_kernels.block_linear_kernel(), cpu_kernels.paged_decode_kernel()
    if ours_mm is None or ours_attn is None:
        raise SystemExit("the kernels are not built here (no compiler, or PDCLUSTER_CPU_KERNELS=0)")
    with tempfile.TemporaryDirectory() as tmp:
        theirs_mm = BlockLinearKernel(cpu_kernels.library_from_source(
            "block_linear", _source_at(rev, "block_linear", Path(tmp))))
        theirs_attn = PagedDecodeKernel(cpu_kernels.library_from_source(
            "paged_decode_attention", _source_at(rev, "paged_decode_attention", Path(tmp))))
    blocks = [m.method.blocks for m in model.modules()
              if isinstance(getattr(m, "method", None), BlockLinearMethod)]
    out = []

    def pair(label, run):   # run(kernel) -> outputs
        same = all(torch.equal(a, b) for a, b in zip(run(0), run(1)))
        ours, theirs = _paired(lambda: run(0), lambda: run(1), repeats)
        out.append((label, ours, theirs, same))

    for r in rows:
        xs = [torch.randn(r, bw.shape[1]) for bw in blocks]
        kernels = (ours_mm, theirs_mm)
        pair(f"all {len(blocks)} matmuls, {r} rows",
             lambda i: [kernels[i](bw, x) for bw, x in zip(blocks, xs)])
    num_layers = model.num_layers
    _, kv_heads, head_dim = model.kv_token_shape
    heads = model.model.layers[0].self_attn.num_heads
    block = 16
    for lens in ([context] * 32, [2048] + [context] * 4):
        widths = [-(-n // block) for n in lens]
        cache = torch.randn(sum(widths) + 1, num_layers, block, 2, kv_heads, head_dim)
        ids = torch.randperm(sum(widths)) + 1
        tables = torch.zeros(len(lens), max(widths), dtype=torch.long)
        start = 0
        for s, w in enumerate(widths):
            tables[s, :w] = ids[start:start + w]
            start += w
        lens_t = torch.tensor(lens)
        q = torch.randn(len(lens), heads, head_dim)
        kernels = (ours_attn, theirs_attn)
        label = (f"decode attention, {len(lens)} seqs x {context} tokens" if len(set(lens)) == 1 else
                 f"decode attention, 2048 + 4 x {context} tokens")
        pair(label, lambda i: [kernels[i](q, cache, layer, tables, lens_t, head_dim ** -0.5)
                               for layer in range(num_layers)])
    return out


INTEGER_BITS = (16, 8)


def _integer_matmuls(model, rows: list[int], repeats: int
                     ) -> list[tuple[str, float, list[tuple[float, float, float]]]]:
    """(measure, float seconds, [(seconds, speedup, relative error) per INTEGER_BITS]) for all the
    model's block matmuls; each integer kernel is timed alternately with the float one."""
    from ...engine.cpu_kernels import integer_block_linear_kernel
    from ...engine.layers.cpu_linear import BlockLinearMethod
    from ...engine.layers.interleaved_blocks import interleave
    kernels = [integer_block_linear_kernel(bits) for bits in INTEGER_BITS]
    methods = [m.method for m in model.modules() if isinstance(getattr(m, "method", None), BlockLinearMethod)]
    if None in kernels or not methods:
        raise SystemExit("the block kernels are not built here")
    layers = [(m.kernel, m.blocks, interleave(m.blocks)) for m in methods]
    out = []
    for r in rows:
        xs = [torch.randn(r, bw.shape[1]) for _, bw, _ in layers]
        floats = lambda: [k(bw, x) for (k, bw, _), x in zip(layers, xs)]  # noqa: E731
        exact = floats()
        by_bits, float_best = [], float("inf")
        for kernel in kernels:
            ints = lambda: [kernel(ib, x) for (_, _, ib), x in zip(layers, xs)]  # noqa: E731
            err = max(((a - b).norm() / b.norm()).item() for a, b in zip(ints(), exact))
            ours, ref = _paired(ints, floats, repeats)
            float_best = min(float_best, ref)
            by_bits.append((ours, ref / ours, err))
        out.append((f"all {len(layers)} matmuls, {r} rows", float_best, by_bits))
    return out


ACTIVATIONS = ("float32", "int16", "int8")


def _engines_by_activations(rows: list[int], context: int, steps: int
                            ) -> tuple[list[tuple[int, list[float]]], list[float]]:
    """Median decode steps per batch size of an engine for each of ACTIVATIONS taken in turn, and
    each one's best prefill of a 512-token prompt."""
    from ...engine import LLM, SamplingParams
    from .bench_engine import random_prompts
    engines = [LLM(num_kv_blocks=_blocks_for(rows + [1], max(context, 512), steps),
                   enable_prefix_caching=False, max_num_batched_tokens=512,
                   matmul_activations=a).engine for a in ACTIVATIONS]
    steps_by_rows = _decode_steps_in_turn([(eng, None) for eng in engines], rows, context, steps)
    prompt = random_prompts(1, 512, engines[0].hf_config["vocab_size"], 7)[0]
    best = [float("inf")] * len(engines)
    for trial in range(3):
        for i, eng in enumerate(engines):
            eng.add_request(f"prefill{trial}", prompt_token_ids=prompt,
                            params=SamplingParams(max_tokens=1, temperature=0))
            t = time.perf_counter()
            while eng.has_unfinished_requests():
                eng.step()
            best[i] = min(best[i], time.perf_counter() - t)
    return steps_by_rows, best


KV_DTYPES = ("float32", "float16", "bfloat16")
PARTS = ("kernels", "kv-dtypes", "decode-step", "activations")


def _decode_steps_in_turn(variants: list[tuple[object, object]], rows: list[int], context: int,
                          steps: int) -> list[tuple[int, list[float]]]:
    """Per batch size, the median decode step (s) of each variant (engine, prepare): `b` sequences
    decode on each distinct engine, and the variants take `steps` steps each in turn, a variant's
    `prepare()` (when not None) run before each of its steps."""
    import statistics

    from ...engine import SamplingParams
    from .bench_engine import random_prompts
    engines = list({id(eng): eng for eng, _ in variants}.values())
    params = SamplingParams(temperature=0, max_tokens=steps * len(variants) + 4, ignore_eos=True)
    out = []
    for b in rows:
        for i, eng in enumerate(engines):
            for j, p in enumerate(random_prompts(b, context, eng.hf_config["vocab_size"], b)):
                eng.add_request(f"step{b}-{i}-{j}", prompt_token_ids=p, params=params)
            while eng.stats().num_waiting or any(len(s.output_token_ids) == 0
                                                 for s in eng.scheduler.running):
                eng.step()                   # prompts in: from here on every step decodes b tokens
        times: list[list[float]] = [[] for _ in variants]
        for _ in range(steps):
            for i, (eng, prepare) in enumerate(variants):
                if prepare is not None:
                    prepare()
                t = time.perf_counter()
                eng.step()
                times[i].append(time.perf_counter() - t)
        for i, eng in enumerate(engines):
            for j in range(b):
                eng.abort_request(f"step{b}-{i}-{j}")
            while eng.has_unfinished_requests():
                eng.step()
        out.append((b, [statistics.median(t) for t in times]))
    return out


def _blocks_for(rows: list[int], context: int, steps: int) -> int:
    return max(rows) * (-(-(context + steps + 8) // 16)) + 8


def _steps_by_kv_dtype(rows: list[int], context: int, steps: int) -> list[tuple[int, list[float]]]:
    """Per batch size, the median decode step (s) of an engine with each of KV_DTYPES' caches."""
    from ...engine import LLM
    engines = [LLM(num_kv_blocks=_blocks_for(rows, context, steps), kv_cache_dtype=d,
                   enable_prefix_caching=False).engine for d in KV_DTYPES]
    return _decode_steps_in_turn([(eng, None) for eng in engines], rows, context, steps)


def _decode_step_in_one_call(rows: list[int], context: int, steps: int) -> list[tuple[int, list[float]]]:
    """Per batch size, the median decode step (s) with all layers in one call and module by module,
    the two taken in turn on one engine."""
    from ...engine import LLM
    eng = LLM(num_kv_blocks=_blocks_for(rows, context, 2 * steps), enable_prefix_caching=False).engine
    decoder = eng.model.model
    one_call = decoder.decode_layers
    if one_call is None:
        raise SystemExit("the model does not take decode steps in one call here")
    try:
        return _decode_steps_in_turn(
            [(eng, lambda: setattr(decoder, "decode_layers", one_call)),
             (eng, lambda: setattr(decoder, "decode_layers", None))], rows, context, steps)
    finally:
        decoder.decode_layers = one_call


def _small_ops(model, intermediate: int, rows: list[int], repeats: int) -> list[tuple[str, float, float]]:
    from ...engine.cpu_kernels import fused_ops_kernel
    from ...engine.layers import activation, norm, rotary
    from ...engine.layers.activation import silu_and_mul
    from ...engine.layers.attention import AttentionMetadata, write_kv
    fused = fused_ops_kernel()
    if fused is None:
        raise SystemExit("the fused small-op kernels are not built here")
    layers = model.model.layers
    attn = layers[0].self_attn
    hidden = layers[0].input_layernorm.weight.shape[0]
    cache = torch.zeros(64, len(layers), 16, 2, attn.num_kv_heads, attn.head_dim)

    def measure(r: int) -> tuple[str, float, float]:
        x = torch.randn(r, hidden)
        q = torch.randn(r, attn.num_heads, attn.head_dim)
        k = torch.randn(r, attn.num_kv_heads, attn.head_dim)
        v = torch.randn(r, attn.num_kv_heads, attn.head_dim)
        gate_up = torch.randn(r, 2 * intermediate)
        positions = torch.randint(0, 512, (r,))
        slots = torch.randperm(64 * 16)[:r]
        meta = AttentionMetadata(   # only the slots matter to the KV write
            slot_blocks=slots // 16, slot_offsets=slots % 16, num_decode=r,
            decode_block_tables=torch.zeros(r, 1, dtype=torch.long),
            decode_mask=torch.ones(r, 1, 1, 16, dtype=torch.bool), decode_lens=torch.ones(r, dtype=torch.long))

        def step(kernels: bool) -> None:
            for i, layer in enumerate(layers):
                layer.input_layernorm(x)
                layer.self_attn.rotary(positions, q, k)
                if not (kernels and fused.write_kv(cache, i, k, v, meta.slot_blocks, meta.slot_offsets)):
                    write_kv(cache, i, torch.stack((k, v), dim=1), meta)
                layer.post_attention_layernorm(x)
                silu_and_mul(gate_up)

        def torch_step() -> None:
            modules = (norm, rotary, activation)
            for m in modules:
                m.fused_ops_kernel = lambda: None
            try:
                step(False)
            finally:
                for m in modules:
                    m.fused_ops_kernel = fused_ops_kernel

        return f"small ops of a step, {r} rows", *_paired(lambda: step(True), torch_step, repeats)

    return [measure(r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per engine, KV cache dtypes")
    ap.add_argument("--parts", nargs="+", choices=PARTS,
                    help="default: all, or none with --against")
    ap.add_argument("--against", metavar="REV",
                    help="also time the matmul and attention kernels against those of git revision REV")
    args = ap.parse_args(argv)
    if args.parts is None:
        args.parts = [] if args.against else list(PARTS)
    if args.against:
        from ...engine import LLM
        engine = LLM(num_kv_blocks=16, matmul_activations="float32").engine
        rows = _against(engine.model, args.against, args.rows, args.context, args.repeats)
        print(f"threads {torch.get_num_threads()}, best of {args.repeats}; ms per decode step")
        print(f"{'measure':<56}{'this tree':>10}{args.against[:12]:>14}{'speedup':>9}  outputs")
        for label, ours, theirs, same in rows:
            print(f"{label:<56}{ours * 1e3:>10.2f}{theirs * 1e3:>14.2f}{theirs / ours:>8.2f}x  "
                  f"{'bit for bit' if same else 'DIFFER'}")
        del engine
    if "kernels" in args.parts:
        from ...engine import LLM
        engine = LLM(num_kv_blocks=16, matmul_activations="float32").engine
        model = engine.model
        rows = (_matmuls(model, args.rows, args.repeats)
                + [_attention(model, args.context, args.repeats, getattr(torch, d)) for d in KV_DTYPES]
                + _small_ops(model, engine.hf_config["intermediate_size"], args.rows, args.repeats))
        print(f"threads {torch.get_num_threads()}, best of {args.repeats}; ms per decode step")
        print(f"{'measure':<56}{'kernel':>10}{'torch path':>12}{'speedup':>9}")
        for label, ours, ref in rows:
            print(f"{label:<56}{ours * 1e3:>10.2f}{ref * 1e3:>12.2f}{ref / ours:>8.2f}x")
        print("torch path: F.linear on the dense float32 weights (BLAS); gather + SDPA for attention; "
              "torch ops for the small ops.")
        del engine, model
    if "kv-dtypes" in args.parts:
        print(f"\nthe engine's decode step by KV cache dtype ({args.context}-token prompts, median of "
              f"{args.steps} steps taken in turn), ms")
        print(f"{'sequences':<12}" + "".join(f"{d:>12}" for d in KV_DTYPES)
              + "".join(f"{d + ' / f32':>18}" for d in KV_DTYPES[1:]))
        for b, med in _steps_by_kv_dtype(args.rows, args.context, args.steps):
            print(f"{b:<12}" + "".join(f"{m * 1e3:>12.2f}" for m in med)
                  + "".join(f"{m / med[0]:>17.2f}x" for m in med[1:]))
    if "decode-step" in args.parts:
        print(f"\nthe engine's decode step, all layers in one call vs module by module ({args.context}-token "
              f"prompts, threads {torch.get_num_threads()}, median of {args.steps} steps each, taken in "
              "turn), ms")
        print(f"{'sequences':<12}{'one call':>12}{'modules':>12}{'speedup':>10}")
        for b, (one, mods) in _decode_step_in_one_call(args.rows, args.context, args.steps):
            print(f"{b:<12}{one * 1e3:>12.2f}{mods * 1e3:>12.2f}{mods / one:>9.2f}x")
    if "activations" in args.parts:
        from ...engine import LLM
        engine = LLM(num_kv_blocks=16, matmul_activations="float32").engine
        rows = _integer_matmuls(engine.model, sorted(set(args.rows) | {512}), args.repeats)
        del engine
        print(f"\nmatmul_activations: the integer kernel's against the float32 one, threads "
              f"{torch.get_num_threads()}, best of {args.repeats}; ms, speedup, error relative to float32")
        print(f"{'measure':<40}{'float32':>10}" + "".join(f"{f'int{b}':>10}{'speedup':>9}{'error':>10}"
                                                       for b in INTEGER_BITS))
        for label, ref, by_bits in rows:
            print(f"{label:<40}{ref * 1e3:>10.2f}" + "".join(f"{t * 1e3:>10.2f}{x:>8.2f}x{err:>10.1e}"
                                                           for t, x, err in by_bits))
        steps, prefill = _engines_by_activations(args.rows, args.context, args.steps)
        print(f"the engine's decode step ({args.context}-token prompts, median of {args.steps} steps each, "
              "taken in turn) and a 512-token prefill (best of 3), ms")
        print(f"{'sequences':<12}" + "".join(f"{a:>10}" for a in ACTIVATIONS)
              + "".join(f"{a + ' speedup':>15}" for a in ACTIVATIONS[1:]))
        for label, times in [(str(b), med) for b, med in steps] + [("prefill 512", prefill)]:
            print(f"{label:<12}" + "".join(f"{t * 1e3:>10.2f}" for t in times)
                  + "".join(f"{times[0] / t:>14.2f}x" for t in times[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
