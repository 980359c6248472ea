"""Quantized checkpoints: AWQ w4a16 (AutoAWQ GEMM) and compressed-tensors int4 pack-quantized (Kimi-K2
Thinking style), packed by the test helper, loaded by our engine, against transformers models that
hold the dequantized weights."""
from __future__ import annotations

import pytest
import torch

import model_factory as mf
from pdcluster.engine import LLM
from pdcluster.engine.layers.quant import (AWQLinearMethod, LinearMethod, PackQuantizedLinearMethod,
                                    QuantConfig, dequantize_awq, unpack_int32)

# The reference holds exactly the values the packed tensors encode (dequantized in float32 by the
# helper); both sides then compute in float32, so only summation order differs (~1e-6).
ATOL = 1e-4


def test_awq_dequantize_reads_autoawq_packing():
    torch.manual_seed(0)
    w = torch.randn(24, 64)                          # nn.Linear weight [out, in]
    qweight, qzeros, scales, deq = mf.awq_quantize(w, group=16)
    assert qweight.shape == (64, 3) and qzeros.shape == (4, 3) and scales.shape == (4, 24)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales).t(), deq)
    assert (deq - w).abs().max() < (w.abs().max() / 15)        # and it is a real 4-bit quantization


def test_pack_quantized_unpack_reads_compressed_tensors_packing():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    packed, scale, deq = mf.pack_quantize(w, group=32)
    assert packed.shape == (8, 8) and packed.dtype == torch.int32 and scale.shape == (8, 2)
    q = unpack_int32(packed, 4)
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(q.float() * scale.repeat_interleave(32, dim=1), deq)
    method = PackQuantizedLinearMethod(32, 4, torch.float32)
    assert torch.equal(method.dense_weight({"weight_packed": packed, "weight_scale": scale}), deq)


def test_quant_config_selects_layers_like_the_checkpoints():
    kimi = QuantConfig.from_hf({"torch_dtype": "bfloat16",
                                "quantization_config": mf.pack_quantized_config(32, mf.KIMI_K2_IGNORE)})
    experts = kimi.linear_method(["model.layers.5.mlp.experts.0.gate_proj"])
    assert isinstance(experts, PackQuantizedLinearMethod)
    assert experts.scale_dtype == torch.bfloat16 and experts.group_size == 32
    for dense in ("model.layers.5.self_attn.kv_b_proj", "model.layers.5.mlp.shared_experts.up_proj",
                  "model.layers.0.mlp.down_proj", "lm_head"):
        assert type(kimi.linear_method([dense])) is LinearMethod, dense
    awq = QuantConfig.from_hf({"quantization_config": mf.awq_config(128, ["o_proj"])})
    assert isinstance(awq.linear_method(["model.layers.0.self_attn.q_proj"]), AWQLinearMethod)
    assert type(awq.linear_method(["model.layers.0.self_attn.o_proj"])) is LinearMethod
    with pytest.raises(ValueError, match="not quantized alike"):
        awq.linear_method(["x.q_proj", "x.o_proj"])
    with pytest.raises(NotImplementedError):
        QuantConfig.from_hf({"quantization_config": {"quant_method": "fp8"}})


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return mf.save_model(mf.deepseek_config(), tmp_path_factory.mktemp("deepseek"), seed=3)


CASES = {
    # DeepSeek-R1 AWQ: every projection of every layer, kv_b_proj included (so MLA's absorbed
    # up-projections come from dequantized weights)
    "deepseek-awq": ("deepseek", "awq", 16, mf.is_layer_linear, mf.awq_config(16)),
    # Kimi-K2 Thinking: int4 routed experts only, group 32, everything else bf16/dense
    "deepseek-int4-kimi": ("deepseek", "pack-quantized", 32, mf.is_routed_expert,
                           mf.pack_quantized_config(32, mf.KIMI_K2_IGNORE)),
    # Qwen3-MoE int4 on every linear of the layers (stacked q/k/v and gate/up packed per piece)
    "qwen3-moe-int4": ("qwen3", "pack-quantized", 16, mf.is_layer_linear,
                       mf.pack_quantized_config(16, ["lm_head"])),
    # AWQ with a module left dense through modules_to_not_convert
    "llama-awq": ("llama", "awq", 32, lambda m: mf.is_layer_linear(m) and "o_proj" not in m,
                  mf.awq_config(32, ["o_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_checkpoint_matches_dequantized_reference(case, deepseek, tmp_path):
    base, scheme, group, select, qc = CASES[case]
    if base == "qwen3":
        src = mf.save_model(mf.qwen3_moe_config(), tmp_path / "src", seed=4)
    elif base == "llama":
        src = mf.save_model(mf.llama_config(tie_word_embeddings=False), tmp_path / "src", seed=5)
    else:
        src = deepseek
    mf.quantize_checkpoint(src, tmp_path / "quantized", tmp_path / "dequantized", scheme, group,
                           select, qc)
    batch = mf.prompts(seed=2)[:4]
    out = mf.generate(LLM(model=str(tmp_path / "quantized"), **mf.ENGINE_KWARGS), batch)
    assert mf.max_logprob_error(out, mf.load_reference(tmp_path / "dequantized"), batch) < ATOL
