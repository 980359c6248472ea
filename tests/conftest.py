"""Shared fixtures: the embedded model loaded once per session, by us and by `transformers`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test cluster is a Ray instance of its own: a bare ray.init() would join a `ray start` cluster
# running on the same machine.
os.environ.setdefault("RAY_ADDRESS", "local")


def _ray_env() -> dict[str, str]:
    """What `pdcluster up` gives its Ray, for the test clusters' spec (Serve's proxy mode)."""
    import cluster_harness

    from pdcluster.cluster.launch.ray_env import this_machines_ray_env
    return this_machines_ray_env(cluster_harness.small_spec())


os.environ.update(_ray_env())
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from pdcluster.engine.weights import embedded_model_path
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_model(embedded_path):
    """The reference implementation: transformers' own GGUF loader and Llama code."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        str(embedded_path.parent), gguf_file=embedded_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def llm():
    from pdcluster.engine import LLM
    # a small chunk budget so long prompts are prefilled in several chunks
    return LLM(num_kv_blocks=512, max_num_batched_tokens=96, max_num_seqs=16)
