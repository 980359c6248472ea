"""A decode step through all layers in one C call (engine/models/llama_decode_step.py) gives the
module path's results bit for bit, on a tiny random Llama whose projections are GGUF Q4_1 blocks;
steps it does not take (prompt chunks) and models it does not take run the modules."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pdcluster.engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler on this machine")

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7, 8, 9] * 7, list(range(200, 233))]


def _gguf_model(path, config=None):
    """A random Llama (or `config`'s model) saved with every layer's projections quantized to Q4_1
    and back, as the GGUF loader hands them over (so the engine keeps them as blocks)."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as QT
    from model_factory import llama_config, save_model
    from safetensors.torch import load_file, save_file

    save_model(config or llama_config(), path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            q = quants.dequantize(quants.quantize(w.numpy(), QT.Q4_1), QT.Q4_1)
            tensors[name] = torch.from_numpy(np.array(q, dtype=np.float32))
    save_file(tensors, file, metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _gguf_model(tmp_path_factory.mktemp("q4-llama"))


def _llm(model: str, **kw) -> LLM:
    return LLM(model=model, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32,
               max_num_seqs=8, **kw)


class _Counted:
    """Wraps the decoder's DecodeLayers: how many steps it took, and how many it left to the modules."""

    def __init__(self, inner) -> None:
        self.inner, self.taken, self.declined = inner, 0, 0

    def __call__(self, *args):
        out = self.inner(*args)
        self.taken += out is not None
        self.declined += out is None
        return out


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    return [c.token_ids for c in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("kw", [{}, {"kv_cache_dtype": "float16"},
                                {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                        "prompt_lookup_max": 3, "prompt_lookup_min": 2}},
                                {"matmul_activations": "float32"}, {"matmul_activations": "int8"}],
                         ids=["float32-cache", "float16-cache", "ngram-drafts", "float32-activations",
                              "int8-activations"])
def test_decode_steps_in_one_call_give_the_module_paths_tokens(model, kw):
    llm = _llm(model, **kw)
    decoder = llm.engine.model.model
    assert decoder.decode_layers is not None, "a Q4_1 Llama on the CPU takes the one-call path"
    counted = decoder.decode_layers = _Counted(decoder.decode_layers)
    fused = _greedy(llm)
    # prompt chunks (4 prompts over a 32-token budget) went to the modules, decode steps did not
    assert counted.taken >= 5 and counted.declined > 0
    decoder.decode_layers = None
    assert _greedy(llm) == fused


def test_a_decode_step_is_the_module_paths_bit_for_bit(model):
    from pdcluster.engine.models import causal_lm

    llm = _llm(model)
    decoder = llm.engine.model.model
    fused, seen = decoder.decode_layers, []
    forward = causal_lm.DecoderModel.forward

    def compare(self, input_ids, positions, kv_cache, meta):
        if meta.num_decode == input_ids.shape[0] > 1 and not meta.prefills:
            x = self.embed_tokens(input_ids)
            theirs_cache = kv_cache.clone()
            ours = fused(x, positions, kv_cache, meta)
            theirs = x
            for layer in self.layers:
                theirs = layer(positions, theirs, theirs_cache, meta)
            seen.append((torch.equal(ours.view(torch.int32), theirs.view(torch.int32)),
                         torch.equal(kv_cache, theirs_cache), torch.equal(x, self.embed_tokens(input_ids))))
            return self.norm(ours)
        return forward(self, input_ids, positions, kv_cache, meta)

    decoder.decode_layers = None
    causal_lm.DecoderModel.forward = compare
    try:
        _greedy(llm)
    finally:
        causal_lm.DecoderModel.forward = forward
    # every layer's output and every KV entry written are the same bits; the input is left alone
    assert seen and all(all(s) for s in seen), seen


def test_models_and_steps_it_does_not_take_run_the_modules(model, tmp_path):
    from pdcluster.engine.layers.attention import AttentionMetadata, PrefillSegment
    from pdcluster.engine.models.llama_decode_step import _qualifies

    llm = _llm(model)
    decoder = llm.engine.model.model
    x = torch.zeros(2, 64)
    meta = AttentionMetadata(slot_blocks=torch.zeros(2, dtype=torch.long),
                             slot_offsets=torch.arange(2), num_decode=1,
                             decode_block_tables=torch.zeros(1, 1, dtype=torch.long),
                             decode_mask=torch.ones(1, 1, 1, 16, dtype=torch.bool),
                             decode_lens=torch.ones(1, dtype=torch.long),
                             prefills=[PrefillSegment(1, 1, 1, torch.zeros(1, dtype=torch.long))])
    assert decoder.decode_layers(x, torch.zeros(2, dtype=torch.long), llm.engine.kv_cache, meta) is None

    from model_factory import VOCAB, llama_config, qwen3_moe_config, save_model
    from transformers import Qwen2Config

    qwen2 = Qwen2Config(**{k: getattr(llama_config(), k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")})
    assert qwen2.vocab_size == VOCAB
    biased = _llm(_gguf_model(tmp_path / "biased", qwen2))   # q/k/v biases
    assert biased.engine.model.model.decode_layers is None
    assert "bias" in _qualifies(biased.engine.model)
    moe = _llm(_gguf_model(tmp_path / "moe", qwen3_moe_config()))   # Llama layers, MoE MLPs
    assert moe.engine.model.model.decode_layers is None
    assert "plain Llama layer" in _qualifies(moe.engine.model)
    dense = _llm(str(save_model(llama_config(), tmp_path / "dense")))   # float32 weights: no blocks
    assert dense.engine.model.model.decode_layers is None
    assert "GGUF blocks" in _qualifies(dense.engine.model)


def test_the_embedded_model_takes_its_decode_steps_in_one_call(llm):
    # SmolLM2's GGUF: every projection Q4_1, plain Llama layers
    assert llm.engine.model.model.decode_layers is not None
