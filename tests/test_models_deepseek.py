"""DeepSeek-V3 (R1, Kimi-K2) through our loader and engine against transformers' DeepseekV3ForCausalLM:
tiny random checkpoints, several prompts batched with chunked prefill and a prefix-cache hit."""
from __future__ import annotations

import pytest
import torch

import model_factory as mf
from pdcluster.engine import LLM

# Both sides run float32 from the same weights and differ only in summation order (packed batches,
# einsum vs linear, absorbed latent attention in decode): ~1e-6 on these log-probabilities. 1e-4
# leaves ample room while real mistakes show up far above it (e.g. a missing YaRN attention factor
# moves them by ~6e-2, a wrong rope interleave or softmax scale changes the greedy tokens).
ATOL = 1e-4

CONFIGS = {
    # DeepSeek-V3/R1 shape: q LoRA, interleaved rope, YaRN with mscale, 4 groups pick 2, one dense
    # layer first
    "v3": {},
    # Kimi-K2 / V2-Lite traits: no q LoRA, one expert group, unnormalized top-k, plain rope in the
    # rotate-half layout, two dense layers first, two shared experts
    "k2-like": dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                    rope_interleave=False, first_k_dense_replace=2, n_shared_experts=2,
                    num_hidden_layers=4, rope_parameters=dict(rope_type="default",
                                                              rope_theta=50000.0)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"deepseek-{request.param}")
    return mf.save_model(mf.deepseek_config(**CONFIGS[request.param]), path, seed=1)


def test_matches_transformers(checkpoint):
    batch = mf.prompts()
    llm = LLM(model=str(checkpoint), **mf.ENGINE_KWARGS)
    out = mf.generate(llm, batch)
    assert mf.max_logprob_error(out, mf.load_reference(checkpoint), batch) < ATOL
    # the batch took the prefix-cache path through MLA (latents read back from the paged cache)
    assert out[-1].num_cached_tokens == 48


def test_cache_holds_only_latent_and_rope(checkpoint):
    llm = LLM(model=str(checkpoint), **mf.ENGINE_KWARGS)
    cfg, engine = llm.engine.hf_config, llm.engine
    assert engine.model.kv_token_shape == (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],)
    per_token = engine.block_nbytes / engine.config.block_size
    assert per_token == ((cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * cfg["num_hidden_layers"]
                         * torch.float32.itemsize)
    # per-head K/V would be heads * (nope + rope + v) per layer: the latent cache is smaller
    assert per_token < (cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
                        + cfg["v_head_dim"]) * cfg["num_hidden_layers"] * torch.float32.itemsize)


def test_grouped_topk_matches_transformers_router():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from pdcluster.engine.layers.moe import grouped_topk
    cfg = mf.deepseek_config(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(50, cfg.hidden_size)
    _, ref_w, ref_ids = router(x)
    w, ids = grouped_topk(x @ router.weight.T, 6, 8, 3, True, cfg.routed_scaling_factor,
                          router.e_score_correction_bias)
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), atol=1e-6)
    # the chosen experts come from at most topk_group groups of 4
    assert int((ids // 4).sort(dim=-1).values.diff(dim=-1).ne(0).sum(dim=-1).max()) <= 2
