"""Prefill in one process, decode in another, KV through a real mooncake_master: same greedy tokens.

Also: the store as a cluster-wide prefix cache, a corrupt block caught by its checksum, and a dead
master falling back to recomputation — never a wrong token. The handoff tests run in both store
client modes: each process with its own embedded client, and both attached to one node client.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdcluster.cluster.kvstore.connector import commit_key, make_connector, open_backend
from pdcluster.cluster.kvstore.manifest import from_bytes, manifest_to_handoff
from pdcluster.cluster.kvstore.master import MasterConfig, MooncakeMaster
from pdcluster.cluster.kvstore.node_client import MooncakeNodeClient, NodeClientConfig
from pdcluster.cluster.spec import StoreSpec
from pdcluster.engine import LLM, SamplingParams

pytestmark = pytest.mark.integration
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def store_spec(master: MooncakeMaster, node: MooncakeNodeClient | None = None) -> StoreSpec:
    cfg = master.config
    spec = StoreSpec(rpc_port=cfg.rpc_port, metadata_port=cfg.metadata_port,
                     global_segment_mib=128, local_buffer_mib=16)
    if node is None:
        return spec
    return spec.model_copy(update={"client": "node", "node_client_port": node.config.port,
                                   "node_client_transfer_port": node.config.transfer_port})


@pytest.fixture(scope="module")
def master():
    with MooncakeMaster(MasterConfig()) as m:
        yield m


@pytest.fixture(scope="module", params=["embedded", "node"])
def node_client(request, master):
    """None (each process runs its own client), or the node client both processes attach to."""
    if request.param == "embedded":
        yield None
        return
    with MooncakeNodeClient(NodeClientConfig(master.rpc_address, master.metadata_url,
                                             global_segment_size=256 << 20)) as node:
        yield node


@pytest.fixture(scope="module")
def prefill_proc(master, node_client):
    cfg = master.config
    node_ports = [] if node_client is None else [str(node_client.config.port),
                                                 str(node_client.config.transfer_port)]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("pd_prefill_process.py")),
         str(cfg.rpc_port), str(cfg.metadata_port), *node_ports],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["ready"]
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def prefill(proc, prompts: list[list[int]], tag: str) -> tuple[list, dict]:
    proc.stdin.write(json.dumps({"prompts": prompts, "tag": tag, "max_tokens": MAX_TOKENS}) + "\n")
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline())
    return [from_bytes(bytes.fromhex(h)) for h in answer["manifests"]], answer["stats"]


@pytest.fixture(scope="module")
def decoder(llm, master, node_client):
    """The session's engine acting as a decode worker with its own store client and segment; in node
    mode an engine of its own, its KV cache allocated in memory shared with the node client."""
    spec = store_spec(master, node_client)
    if node_client is None:
        connector = make_connector(spec, llm.engine)
        assert connector is not None
        yield llm
        llm.engine.set_kv_connector(None)
        return
    backend = open_backend(spec)
    assert backend is not None
    node_llm = LLM(num_kv_blocks=512, max_num_batched_tokens=96, max_num_seqs=16,
                   kv_allocator=backend.allocate)
    assert make_connector(spec, node_llm.engine, backend=backend) is not None
    yield node_llm
    backend.close()


def decode(llm, manifests, local_hits: dict | None = None) -> dict[str, list[int]]:
    """Continue the handed-off requests; `local_hits` gets each one's decode-side prefix-cache tokens."""
    eng = llm.engine
    tokens = {}
    for m in manifests:
        h = manifest_to_handoff(m)
        eng.add_request(h.request_id, prompt_token_ids=list(h.token_ids), params=GREEDY, kv_import=h)
        tokens[h.request_id] = [h.first_token]
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
            if local_hits is not None:
                local_hits[out.request_id] = out.num_cached_tokens
    return tokens


def prefill_here(llm, request_id: str, ids: list[int]):
    """Prefill `ids` on the decoder's own engine (exporting, as a prefill worker does): the engine's
    stats before, the handoff output, the stats after."""
    eng = llm.engine
    before = eng.stats()
    eng.add_request(request_id, prompt_token_ids=ids, params=GREEDY, kv_export=True)
    while eng.has_unfinished_requests():
        (out,) = eng.step() or (None,)
    return before, out, eng.stats()


def prompts_for(llm, tag: str) -> list[list[int]]:
    questions = [f"[{tag}] What is the capital of Italy?",
                 f"[{tag}] Explain in two sentences why the sky is blue, for a curious child.",
                 f"[{tag}] " + "Count the sheep: one sheep, two sheep, three sheep. " * 6]
    return [llm.chat_prompt([{"role": "user", "content": q}]) for q in questions]


def test_prefill_and_decode_in_two_processes_match_single_engine(decoder, prefill_proc):
    llm = decoder
    prompts = prompts_for(llm, "pd")
    manifests, pstats = prefill(prefill_proc, prompts, "pd")
    before = llm.engine.stats()
    local_hits: dict[str, int] = {}
    got = decode(llm, manifests, local_hits)
    after = llm.engine.stats()
    expected_blocks = sum(len(m.blocks) for m in manifests)
    assert expected_blocks == sum(-(-len(p) // 16) for p in prompts)
    assert pstats["kv_blocks_saved"] == expected_blocks
    # every prompt block came from the store, except the shared chat-template head that the
    # decoder's own prefix cache already held (the first request brought it in)
    local_blocks = sum(local_hits.values()) // 16
    assert after.kv_blocks_loaded - before.kv_blocks_loaded == expected_blocks - local_blocks
    assert after.kv_blocks_loaded - before.kv_blocks_loaded > expected_blocks // 2
    assert after.kv_recomputed_tokens == before.kv_recomputed_tokens
    # decode computed only the generated tokens (each one's KV), not the prompts
    assert after.computed_tokens_total - before.computed_tokens_total == len(prompts) * (MAX_TOKENS - 1)
    single = llm.generate(prompts, GREEDY)            # the colocated, single-engine path
    assert [got[m.request_id] for m in manifests] == [s.token_ids for s in single]
    assert after.num_free_blocks == after.num_total_blocks


def test_store_prefix_cache_computes_only_new_blocks(decoder, prefill_proc):
    llm = decoder
    shared = "You are a careful travel agent who plans quiet trips. " * 8
    first = llm.tokenizer.encode(shared + "Plan a day in Lisbon.")
    second = llm.tokenizer.encode(shared + "Plan a weekend in Porto by train.")
    prefill(prefill_proc, [first], "prefix")         # another process puts the prefix in the store
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    store_blocks = common // 16
    assert store_blocks >= 4
    before, out, after = prefill_here(llm, "prefix-b", second)
    assert after.store_prefix_hit_tokens - before.store_prefix_hit_tokens == store_blocks * 16
    assert after.computed_tokens_total - before.computed_tokens_total == len(second) - store_blocks * 16
    reference = llm.generate([second], SamplingParams(temperature=0, max_tokens=1))[0]
    assert out.new_token_ids == reference.token_ids


def test_corrupt_prefix_block_is_caught_by_its_commit_record(decoder, prefill_proc):
    llm = decoder
    shared = "Our support desk answers billing questions in plain words. " * 8
    first = llm.tokenizer.encode(shared + "Why was I charged twice?")
    second = llm.tokenizer.encode(shared + "How do I get a refund for May?")
    manifests, _ = prefill(prefill_proc, [first], "prefix-corrupt")
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common // 16 >= 4
    # the third block's bytes are replaced; its commit record (written by the prefill) stays
    victim = manifests[0].blocks[2].key
    backend = llm.engine.kv.connector.backend
    scratch = llm.engine.block_manager.num_blocks - 1
    llm.engine.kv_cache[scratch].normal_()
    assert backend.remove([victim], force=True) == [True]
    assert backend.put_cache_blocks(llm.engine.kv_cache, [scratch], [victim]) == [True]
    before, out, after = prefill_here(llm, "prefix-corrupt-b", second)
    assert after.kv_corrupt_blocks - before.kv_corrupt_blocks == 1
    assert after.store_prefix_hit_tokens - before.store_prefix_hit_tokens == 2 * 16
    assert after.computed_tokens_total - before.computed_tokens_total == len(second) - 2 * 16
    reference = llm.generate([second], SamplingParams(temperature=0, max_tokens=1))[0]
    assert out.new_token_ids == reference.token_ids


def test_corrupt_block_is_caught_and_recomputed(decoder, prefill_proc):
    llm = decoder
    prompts = prompts_for(llm, "corrupt")[1:2]
    manifests, _ = prefill(prefill_proc, prompts, "corrupt")
    victim = manifests[0].blocks[1].key
    connector = llm.engine.kv.connector
    # overwrite the stored object with garbage of the same size, from a block of our own cache
    scratch = llm.engine.block_manager.num_blocks - 1
    llm.engine.kv_cache[scratch].normal_()
    assert connector.backend.remove([victim], force=True) == [True]
    assert connector.backend.put_cache_blocks(llm.engine.kv_cache, [scratch], [victim]) == [True]
    before = llm.engine.stats()
    got = decode(llm, manifests)
    after = llm.engine.stats()
    assert after.kv_corrupt_blocks - before.kv_corrupt_blocks == 1
    assert after.kv_recomputed_tokens - before.kv_recomputed_tokens == len(prompts[0]) - 16
    assert got[manifests[0].request_id] == llm.generate(prompts, GREEDY)[0].token_ids


def test_a_lost_commit_record_is_restored_by_a_verified_handoff(decoder, prefill_proc):
    """A block whose record is gone (evicted apart from it) is invisible to the prefix cache, and a
    later writer finds the block there and commits nothing; the decode that verifies it restores it."""
    llm = decoder
    prompts = prompts_for(llm, "lost-record")[2:3]
    manifests, _ = prefill(prefill_proc, prompts, "lost-record")
    full = [r for r in manifests[0].blocks if r.num_tokens == 16]
    connector = llm.engine.kv.connector
    keys = [r.key for r in full]
    assert connector.backend.remove([commit_key(k) for k in keys], force=True) == [True] * len(keys)
    hits: dict = {}
    got = decode(llm, manifests, hits)
    connector.flush()
    loaded = full[hits[manifests[0].request_id] // 16:]  # not those the decoder held already
    assert len(loaded) >= 2
    assert connector.committed([r.key for r in loaded]) == [r.checksum for r in loaded]
    assert got[manifests[0].request_id] == llm.generate(prompts, GREEDY)[0].token_ids


def test_dead_master_falls_back_to_recomputation(llm):
    with MooncakeMaster(MasterConfig()) as m:
        connector = make_connector(store_spec(m), llm.engine)
        assert connector is not None
        prompt = prompts_for(llm, "dead")[0]
        m.stop()
        eng = llm.engine
        eng.add_request("dead", prompt_token_ids=prompt, params=GREEDY, kv_export=True)
        while eng.has_unfinished_requests():
            (out,) = eng.step() or (None,)
        assert out.finish_reason == "handoff" and out.kv_handoff.blocks == ()
        before = eng.stats()
        eng.add_request("dead-decode", prompt_token_ids=prompt, params=GREEDY, kv_import=out.kv_handoff)
        tokens = [out.kv_handoff.first_token]
        while eng.has_unfinished_requests():
            for o in eng.step():
                tokens += o.new_token_ids
        # nothing came from the store: what the local prefix cache did not hold was recomputed
        assert eng.stats().kv_blocks_loaded == before.kv_blocks_loaded
        assert eng.stats().kv_recomputed_tokens > before.kv_recomputed_tokens
        llm.engine.set_kv_connector(None)
        m.start()                                      # close() is quick with the master back
        connector.close()
    assert tokens == llm.generate([prompt], GREEDY)[0].token_ids
    assert torch.is_tensor(llm.engine.kv_cache)
