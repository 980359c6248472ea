"""Store keys name a model's contents and a deployment: a fine-tune with the same shapes at the same
path gets other keys, as does the next deployment; the router's prefix affinity hashes stay the
keys the engine stores blocks under."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pdcluster.actors.controller import ClusterInfo
from pdcluster.cluster.serve.metrics import ServingMetrics
from pdcluster.cluster.serve.orchestrator import Orchestrator
from pdcluster.engine.config import EngineConfig
from pdcluster.engine.kv_handoff import store_key
from pdcluster.engine.llm_engine import LLMEngine, _fingerprint
from pdcluster.engine.prefix_hash import block_hashes
from safetensors.torch import save_file

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "vocab_size": 16}


def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("numel", [64, 4 << 20])  # one sampled MiB, and a 16 MiB file
def test_same_names_shapes_and_sizes_with_other_bytes_fingerprint_differently(tmp_path, numel):
    base = torch.zeros(numel)
    tuned = base.clone()
    tuned[numel // 2] = 1.0  # one weight in the middle of the file
    a = _checkpoint(tmp_path / "a", {"w": base})
    b = _checkpoint(tmp_path / "b", {"w": tuned})
    again = _checkpoint(tmp_path / "again", {"w": base.clone()})
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    fp = {p.name: _fingerprint(p, CONFIG, torch.float32, torch.float32) for p in (a, b, again)}
    assert fp["a"] != fp["b"] and fp["a"] == fp["again"]
    # a float16 cache's blocks are another engine's, even with the same weights
    assert _fingerprint(a, CONFIG, torch.float32, torch.float16) != fp["a"]


def test_router_affinity_hashes_are_the_engines_store_keys_salted_by_deployment():
    engines = {d: LLMEngine(EngineConfig(device="cpu", num_kv_blocks=8, deployment_id=d))
               for d in ("d1", "d2")}
    prompt = list(range(100, 100 + 3 * 16 + 5))
    keys = {}
    for d, e in engines.items():
        info = ClusterInfo(model_name="m", model_fingerprint=e.fingerprint, deployment_id=d,
                           max_model_len=e.max_model_len, vocab_size=e.hf_config["vocab_size"],
                           block_size=e.config.block_size, workers={}, handles={})
        stored = [store_key(h) for h in block_hashes(prompt, e.config.block_size, e.block_manager.salt)]
        assert ["pdkv/" + h for h in Orchestrator(info, ServingMetrics()).prefix_hashes(prompt)] == stored
        keys[d] = stored
    assert len(keys["d1"]) == 3 and not set(keys["d1"]) & set(keys["d2"])
