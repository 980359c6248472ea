"""Tiny random HF checkpoints for the model tests: built with transformers, saved with save_pretrained
(plus a word-level tokenizer), quantized to AWQ / compressed-tensors, and the greedy reference.

The quantizers here pack weights the way AutoAWQ (awq/modules/linear/gemm.py) and compressed-tensors
(pack_to_int32) do, written independently of the engine's unpacking code.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 256
NEW_TOKENS = 8
# the engine settings every comparison uses: small blocks and a small token budget so prompts are
# prefilled in chunks, several prompts share each step, and decodes batch together
ENGINE_KWARGS = dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]          # AutoAWQ WQLinear_GEMM.from_linear order_map
KIMI_K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                  r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


# ---------------------------------------------------------------------------- configs

def deepseek_config(**overrides):
    from transformers import DeepseekV3Config
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
              num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
              norm_topk_prob=True, max_position_embeddings=512, initializer_range=0.05,
              rope_interleave=True, tie_word_embeddings=False,
              # YaRN as DeepSeek-V3 ships it, with mscale != mscale_all_dim so that both the
              # cos/sin attention factor and the softmax-scale adjustment are exercised
              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                   original_max_position_embeddings=128, beta_fast=32,
                                   beta_slow=1, mscale=1.0, mscale_all_dim=0.8))
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[1],
              max_position_embeddings=512, initializer_range=0.05, tie_word_embeddings=False,
              rope_parameters=dict(rope_type="default", rope_theta=20000.0))
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.05, tie_word_embeddings=True,
              rope_parameters=dict(rope_type="default", rope_theta=5000.0))
    kw.update(overrides)
    return LlamaConfig(**kw)


# ---------------------------------------------------------------------------- building

def save_model(config, path: Path, seed: int = 0) -> Path:
    """A random model of `config` saved as an HF folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):          # make the norms matter
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # zero after init; make it steer routing
                b.copy_(0.05 * torch.randn_like(b))
    model.save_pretrained(path)
    save_tokenizer(path, config.vocab_size)
    return path


def save_mtp_model(config, path: Path, seed: int = 0, own_embedding: bool = False) -> Path:
    """A random DeepSeek-V3 of `config` plus one multi-token-prediction layer, laid out as DeepSeek
    ships it: `model.layers.{n}` (n = num_hidden_layers) holds a decoder layer (MLA + MoE) and
    enorm, hnorm, eh_proj, shared_head.{norm,head}, with `num_nextn_predict_layers: 1` in the config.
    The decoder layer is transformers' layer n of a model one layer deeper (which it then ignores).
    own_embedding: the layer also carries `embed_tokens` (a copy of the model's, as V3 ships it)."""
    from safetensors.torch import load_file, save_file
    n = config.num_hidden_layers
    deeper = config.__class__(**{**config.to_dict(), "num_hidden_layers": n + 1})
    save_model(deeper, path, seed)
    tensors = load_file(str(path / "model.safetensors"))
    hidden, g = config.hidden_size, torch.Generator().manual_seed(seed + 1)
    extra = {"enorm.weight": 1 + 0.2 * torch.randn(hidden, generator=g),
             "hnorm.weight": 1 + 0.2 * torch.randn(hidden, generator=g),
             "eh_proj.weight": 0.05 * torch.randn(hidden, 2 * hidden, generator=g),
             "shared_head.norm.weight": 1 + 0.2 * torch.randn(hidden, generator=g),
             "shared_head.head.weight": 0.05 * torch.randn(config.vocab_size, hidden, generator=g)}
    if own_embedding:
        extra["embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors.update({f"model.layers.{n}.{k}": v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(path)


def load_reference(path: Path):
    """transformers' own implementation of the checkpoint at `path` (float32, eval)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths (1 to 5 blocks of 16); the last repeats 3 blocks of the 4th so
    the prefix cache can serve it."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 19, 40, 77)]
    out.append(out[3][:48] + torch.randint(2, VOCAB, (6,), generator=g).tolist())
    return out


# ---------------------------------------------------------------------------- quantizing

def quantize_checkpoint(src: Path, dst: Path, dequantized: Path, scheme: str, group_size: int,
                        select: Callable[[str], bool], quantization_config: dict) -> None:
    """Write `dst`: src with the weights of the modules `select` picks quantized (scheme "awq" or
    "pack-quantized"), and `dequantized`: a dense checkpoint with exactly the values they encode."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dense = {}, {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and select(module)):
            quantized[name] = dense[name] = w
            continue
        if scheme == "awq":
            qweight, qzeros, scales, deq = awq_quantize(w, group_size)
            quantized.update({f"{module}.qweight": qweight, f"{module}.qzeros": qzeros,
                              f"{module}.scales": scales})
        else:
            packed, scale, deq = pack_quantize(w, group_size)
            quantized.update({f"{module}.weight_packed": packed, f"{module}.weight_scale": scale,
                              f"{module}.weight_shape": torch.tensor(list(w.shape))})
        dense[name] = deq
    assert len(quantized) > len(tensors), "select() picked no weight to quantize"
    for folder, state, qc in ((dst, quantized, quantization_config), (dequantized, dense, None)):
        shutil.copytree(src, folder)
        (folder / "model.safetensors").unlink()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if qc:
            config = json.loads((folder / "config.json").read_text())
            config["quantization_config"] = qc
            (folder / "config.json").write_text(json.dumps(config, indent=1))


def awq_quantize(w: torch.Tensor, group: int):
    """Asymmetric 4-bit per-group quantization of nn.Linear weight w [out, in], packed as AutoAWQ's
    WQLinear_GEMM: qweight [in, out/8], qzeros [in/g, out/8] int32, scales [in/g, out] fp16.
    Returns those and the dequantized [out, in] float32 weight."""
    out_f, in_f = w.shape
    g = w.t().reshape(in_f // group, group, out_f).float()
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-lo / scales.float()).round().clamp(0, 15).to(torch.int32)
    q = (g / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).to(torch.int32)
    q = q.reshape(in_f, out_f)
    deq = ((q - zeros.repeat_interleave(group, 0)).float()
           * scales.float().repeat_interleave(group, 0)).t().contiguous()
    return _awq_pack(q), _awq_pack(zeros), scales, deq


def _awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    # AutoAWQ: for each column block `col`, qweight[:, col] |= intweight[:, col*8 + order_map[i]] << 4i
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for i in range(8):
        packed |= intweight[:, AWQ_ORDER[i]::8] << (4 * i)
    return packed


def pack_quantize(w: torch.Tensor, group: int):
    """Symmetric int4 per-group quantization packed as compressed-tensors pack_to_int32 (8 values
    per int32 along the input axis, value k at bits 4k, offset by +8). Returns weight_packed
    [out, in/8], weight_scale [out, in/g] and the dequantized weight."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    scale = (g.abs().amax(dim=-1) / 7).clamp(min=1e-8).to(w.dtype)
    q = (g / scale.float()[..., None]).round().clamp(-8, 7).to(torch.int8)
    deq = (q.float() * scale.float()[..., None]).reshape(out_f, in_f)
    unsigned = (q.reshape(out_f, in_f) + 8).to(torch.uint8).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    packed = (unsigned.view(out_f, in_f // 8, 8) << shifts).sum(dim=2, dtype=torch.int32)
    return packed, scale, deq


def awq_config(group_size: int, not_converted: list[str] | None = None) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": not_converted}


def pack_quantized_config(group_size: int, ignore: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": None, "ignore": ignore,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group_size, "dynamic": False, "actorder": None,
                            "observer": "minmax"}}}}


def is_routed_expert(module: str) -> bool:
    return re.search(r"\.mlp\.experts\.\d+\.", module) is not None


def is_layer_linear(module: str) -> bool:
    """Every projection inside the decoder layers (not the router, embeddings or lm_head)."""
    return module.startswith("model.layers.") and re.search(r"_proj(_with_mqa)?$", module) is not None


# ---------------------------------------------------------------------------- comparing

@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step log-probabilities, recomputing the whole sequence every step."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(n):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        tokens.append(int(logp.argmax()))
        logprobs.append(logp)
        ids.append(tokens[-1])
    return tokens, logprobs


def generate(llm, batch: list[list[int]], n: int = NEW_TOKENS):
    from pdcluster.engine import SamplingParams
    return llm.generate(batch, SamplingParams(temperature=0, max_tokens=n, logprobs=5,
                                              ignore_eos=True))


def max_logprob_error(completions, reference, batch: list[list[int]]) -> float:
    """Asserts identical greedy tokens; returns the largest |logprob - reference| over every step's
    chosen and top-5 tokens."""
    err = 0.0
    for prompt, got in zip(batch, completions):
        tokens, logprobs = hf_greedy(reference, prompt, len(got.token_ids))
        assert got.token_ids == tokens, f"prompt of {len(prompt)} tokens"
        for lp, ref in zip(got.logprobs, logprobs):
            ids = torch.tensor([t for t, _ in lp.top] + [lp.token_id])
            vals = torch.tensor([v for _, v in lp.top] + [lp.logprob])
            err = max(err, float((vals - ref[ids]).abs().max()))
    return err
