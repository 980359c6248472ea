"""The engine's KV cache allocator hook (EngineConfig.kv_allocator): the cache lives in the memory the
hook returns, the output does not change, and a hook that returns the wrong thing is refused."""
from __future__ import annotations

import pytest
import torch

import model_factory as mf
from pdcluster.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(mf.save_model(mf.llama_config(), tmp_path_factory.mktemp("llama"), seed=6))


def test_cache_lives_in_the_allocated_memory_and_outputs_match(tiny_model):
    handed_out: list[torch.Tensor] = []

    def allocate(nbytes: int) -> torch.Tensor:
        handed_out.append(torch.zeros(nbytes + 64, dtype=torch.uint8))  # more than asked is fine
        return handed_out[-1]

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = mf.prompts()[:3]
    hooked = LLM(tiny_model, num_kv_blocks=32, kv_allocator=allocate)
    (storage,) = handed_out
    cache = hooked.engine.kv_cache
    assert cache.data_ptr() == storage.data_ptr()
    assert cache.numel() * cache.element_size() == 32 * hooked.engine.block_nbytes
    got = [c.token_ids for c in hooked.generate(prompts, params)]
    assert storage.any()  # the KV was written there
    assert got == [c.token_ids for c in LLM(tiny_model, num_kv_blocks=32).generate(prompts, params)]


def test_wrong_storage_is_refused(tiny_model):
    with pytest.raises(ValueError, match="kv_allocator"):
        LLM(tiny_model, num_kv_blocks=32, kv_allocator=lambda n: torch.zeros(n // 4))  # float32
    with pytest.raises(ValueError, match="kv_allocator"):
        LLM(tiny_model, num_kv_blocks=32, kv_allocator=lambda n: torch.zeros(n - 1, dtype=torch.uint8))
