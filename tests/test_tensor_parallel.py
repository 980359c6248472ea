"""Tensor parallel on CPU: two gloo ranks (spawned processes) give the same greedy tokens as one rank,
for DeepSeek-V3 (dense and AWQ) and Llama (kv heads fewer than ranks), each rank holding its share;
each rank hands its own KV shard off through a store, and the ranks agree on what loaded."""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import model_factory as mf
from pdcluster.engine import LLM
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.distributed import shutdown_tensor_parallel
from pdcluster.engine.sampling import SamplingParams

ATOL = 1e-4   # float32; TP only splits sums across ranks (see test_models_deepseek.py)
TP = 2
HANDOFF_GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _leave(rank_done: Path) -> None:
    """End a spawned rank whose results are on disk and whose group is destroyed, without the
    interpreter's teardown: a rank once aborted there in CI ('terminate called without an active
    exception', C++ threads torch or gloo leave to static destructors)."""
    assert rank_done.exists()
    shutdown_tensor_parallel()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, port: int, models: dict[str, str], out_dir: str) -> None:
    faulthandler.enable(all_threads=True)   # an abort in a rank prints its Python stacks
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
    _leave(Path(out_dir, f"{name}.{rank}.json"))


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


# ---------------------------------------------------------------------------- KV handoff per rank

class DictStore(KVConnector):
    """An in-process store; each rank has its own (its keys are its own anyway)."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache, self.blocks, self.commits = cache, {}, {}

    def save(self, keys, block_ids, checksums):
        for key, b, crc in zip(keys, block_ids, checksums):
            if key not in self.blocks:  # commit only what this call stored
                self.blocks[key] = self.cache[b].clone()
                if crc is not None:
                    self.commits[key] = crc
        return [True] * len(keys)

    def commit(self, keys, checksums):
        for key, crc in zip(keys, checksums):
            self.commits.setdefault(key, crc)

    def load(self, keys, block_ids):
        for key, b in zip(keys, block_ids):
            if key in self.blocks:
                self.cache[b].copy_(self.blocks[key])
        return [key in self.blocks for key in keys]

    def committed(self, keys):
        return [self.commits.get(key) if key in self.blocks else None for key in keys]


def _run(engine, request_id: str, prompt: list[int], **kwargs) -> tuple[list[int], object]:
    engine.add_request(request_id, prompt_token_ids=prompt, params=HANDOFF_GREEDY, **kwargs)
    tokens, handoff = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            handoff = out.kv_handoff or handoff
    return tokens, handoff


def _handoff_worker(rank: int, port: int, model: str, out_dir: str) -> None:
    """Export a prompt's KV from this rank, import it back (prefix caching off, so it comes from the
    store), then again with rank 1's shard of block 2 gone, then find it as a store prefix."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    llm = LLM(model=model, tp_rank=rank, tp_size=TP,
              **{**mf.ENGINE_KWARGS, "enable_prefix_caching": False})
    eng = llm.engine
    store = DictStore(eng.kv_cache)
    eng.set_kv_connector(store)
    prompt = mf.prompts()[3]                       # 77 tokens: 4 full blocks and a partial one
    first, handoff = _run(eng, "p", prompt, kv_export=True)
    counts = {}
    tokens = {}
    for case in ("complete", "rank1-missing-block2"):
        if case == "rank1-missing-block2" and rank == 1:
            del store.blocks[handoff.blocks_of_rank(1)[2].key]
        before = eng.stats()
        tokens[case] = first + _run(eng, case, prompt, kv_import=handoff)[0]
        after = eng.stats()
        counts[case] = (after.kv_blocks_loaded - before.kv_blocks_loaded,
                        after.kv_recomputed_tokens - before.kv_recomputed_tokens)
    tokens["store-prefix"] = _run(eng, "again", prompt)[0]
    Path(out_dir, f"handoff.{rank}.json").write_text(json.dumps({
        "keys": [[b.key for b in handoff.blocks_of_rank(r)] for r in range(handoff.tp_size)],
        "tokens": tokens, "counts": counts,
        "store_prefix_hit_tokens": eng.stats().store_prefix_hit_tokens,
        "free": eng.block_manager.num_free_blocks == eng.block_manager.num_blocks}))
    _leave(Path(out_dir, f"handoff.{rank}.json"))


def test_each_rank_hands_off_its_own_shard_and_the_ranks_agree_on_what_loaded(tmp_path):
    # 2 kv heads: each rank's cache holds a different head, so its blocks are its own
    model = mf.save_model(mf.llama_config(num_key_value_heads=2), tmp_path / "llama", seed=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_handoff_worker, args=(port, str(model), str(tmp_path)), nprocs=TP, join=True)
    ranks = [json.loads((tmp_path / f"handoff.{r}.json").read_text()) for r in range(TP)]
    want = LLM(model=str(model), **mf.ENGINE_KWARGS).generate([mf.prompts()[3]], HANDOFF_GREEDY)
    blocks = 5
    for rank in ranks:
        keys = rank["keys"]
        assert len(keys) == TP and all(len(k) == blocks for k in keys)
        assert not set(keys[0]) & set(keys[1])     # every rank's shard under its own keys
        assert keys == ranks[0]["keys"]            # the same manifest on every rank
        assert all(t == want[0].token_ids for t in rank["tokens"].values())
        assert rank["counts"]["complete"] == [blocks, 0]
        # rank 1 lost block 2: both ranks keep blocks 0-1 and recompute the rest of the prompt
        assert rank["counts"]["rank1-missing-block2"] == [2, 77 - 2 * 16]
        assert rank["store_prefix_hit_tokens"] == 2 * 16
        assert rank["free"]
