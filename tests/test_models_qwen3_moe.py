"""Qwen3-MoE through our loader and engine against transformers' Qwen3MoeForCausalLM, from per-expert
checkpoints (as released and as save_pretrained writes them) and from transformers' fused 3D layout."""
from __future__ import annotations

import pytest

import model_factory as mf
from pdcluster.engine import LLM

ATOL = 1e-4   # float32 on both sides, summation order only (see test_models_deepseek.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return mf.save_model(mf.qwen3_moe_config(), tmp_path_factory.mktemp("qwen3-moe"), seed=2)


def test_matches_transformers(checkpoint):
    batch = mf.prompts(seed=1)
    llm = LLM(model=str(checkpoint), **mf.ENGINE_KWARGS)
    model = llm.engine.model
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"      # mlp_only_layers=[1]
    out = mf.generate(llm, batch)
    assert mf.max_logprob_error(out, mf.load_reference(checkpoint), batch) < ATOL


def test_fused_expert_layout_loads_the_same(checkpoint, tmp_path):
    """transformers keeps experts as 3D `experts.gate_up_proj` / `experts.down_proj` in memory; a
    checkpoint written from that state dict must give the same model."""
    import shutil

    from safetensors.torch import save_file
    reference = mf.load_reference(checkpoint)
    state = reference.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    fused = tmp_path / "fused"
    shutil.copytree(checkpoint, fused)
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    batch = mf.prompts(seed=1)[:3]
    want = mf.generate(LLM(model=str(checkpoint), **mf.ENGINE_KWARGS), batch)
    got = mf.generate(LLM(model=str(fused), **mf.ENGINE_KWARGS), batch)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [[lp.logprob for lp in c.logprobs] for c in got] == \
        [[lp.logprob for lp in c.logprobs] for c in want]
