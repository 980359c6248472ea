"""Tensor parallel on CPU: two gloo ranks (spawned processes) give the same greedy tokens as one rank,
for DeepSeek-V3 (dense and AWQ) and Llama (kv heads fewer than ranks), each rank holding its share."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import model_factory as mf
from pdcluster.engine import LLM
from pdcluster.engine.parallel import shutdown_tensor_parallel

ATOL = 1e-4   # float32; TP only splits sums across ranks (see test_models_deepseek.py)
TP = 2


def _worker(rank: int, port: int, models: dict[str, str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    for name, path in models.items():
        llm = LLM(model=path, tp_rank=rank, tp_size=TP, **mf.ENGINE_KWARGS)
        out = mf.generate(llm, mf.prompts())
        numel = sum(p.numel() for p in llm.engine.model.parameters())
        Path(out_dir, f"{name}.{rank}.json").write_text(json.dumps({
            "tokens": [c.token_ids for c in out],
            "logprobs": [[lp.logprob for lp in c.logprobs] for c in out],
            "numel": numel, "kv_token_shape": list(llm.engine.model.kv_token_shape)}))
    shutdown_tensor_parallel()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    ds = mf.save_model(mf.deepseek_config(), root / "deepseek", seed=6)
    mf.quantize_checkpoint(ds, root / "deepseek-awq", root / "deepseek-awq-ref", "awq", 16,
                           mf.is_layer_linear, mf.awq_config(16))
    llama = mf.save_model(mf.llama_config(num_key_value_heads=1), root / "llama", seed=7)
    return {"deepseek": ds, "deepseek-awq": root / "deepseek-awq", "llama": llama}


@pytest.fixture(scope="module")
def tp_results(models, tmp_path_factory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("tp-out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, {k: str(v) for k, v in models.items()}, str(out_dir)),
             nprocs=TP, join=True)
    return {name: [json.loads((out_dir / f"{name}.{r}.json").read_text()) for r in range(TP)]
            for name in models}


@pytest.mark.parametrize("name", ["deepseek", "deepseek-awq", "llama"])
def test_two_ranks_match_one(name, models, tp_results):
    llm = LLM(model=str(models[name]), **mf.ENGINE_KWARGS)
    batch = mf.prompts()
    want = mf.generate(llm, batch)
    if name == "llama":    # the single-rank run is itself checked against transformers
        assert mf.max_logprob_error(want, mf.load_reference(models[name]), batch) < ATOL
    full = sum(p.numel() for p in llm.engine.model.parameters())
    for rank in tp_results[name]:
        assert rank["tokens"] == [c.token_ids for c in want]
        err = max(abs(a - lp.logprob) for got, c in zip(rank["logprobs"], want)
                  for a, lp in zip(got, c.logprobs))
        assert err < ATOL
        # each rank holds its share: well under the whole model (replicated: norms, router,
        # MLA's down-projections, llama's single kv head)
        assert rank["numel"] < 0.65 * full
        if name.startswith("deepseek"):   # the latent cache is the same on every rank
            assert rank["kv_token_shape"] == list(llm.engine.model.kv_token_shape)
