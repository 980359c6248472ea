"""MTP speculative decoding on a tiny random DeepSeek-V3 with a multi-token-prediction layer: the
layer's forward against a reference written here from the DeepSeek-V3 paper (section 2.2), and greedy
output with and without speculation token-identical (batched, chunked prefill, a prefix-cache hit,
preemption under a tiny block pool), with every KV block returned."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import model_factory as mf
from pdcluster.engine import LLM, SamplingParams
from pdcluster.engine.sequence import Sequence

MTP = {"method": "mtp", "num_speculative_tokens": 3}
ATOL = 1e-4     # float32 on both sides; see test_models_deepseek.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return mf.save_mtp_model(mf.deepseek_config(), tmp_path_factory.mktemp("deepseek-mtp"), seed=3)


@pytest.fixture(scope="module")
def plain(checkpoint):
    return LLM(model=str(checkpoint), **mf.ENGINE_KWARGS)


@pytest.fixture(scope="module")
def spec(checkpoint):
    return LLM(model=str(checkpoint), speculative_config=MTP, **mf.ENGINE_KWARGS)


# ---------------------------------------------------------------------------- the reference

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class ReferenceMTP:
    """DeepSeek-V3 MTP module 1 from the paper: h'_i = M [RMSNorm(h_i); RMSNorm(Emb(t_{i+1}))]
    (eh_proj; the checkpoint orders the embedding half first), then a Transformer block over the
    positions causally, then the shared output head (here: its own norm and head). The block is
    transformers' DeepSeek-V3 decoder layer (as a one-layer model whose final norm is removed)."""

    def __init__(self, path, main) -> None:
        from transformers import AutoModelForCausalLM
        cfg = json.loads((path / "config.json").read_text())
        n, self.eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
        w = {k.removeprefix(f"model.layers.{n}."): v for k, v in
             load_file(str(path / "model.safetensors")).items() if k.startswith(f"model.layers.{n}.")}
        self.enorm, self.hnorm = w.pop("enorm.weight"), w.pop("hnorm.weight")
        self.eh_proj = w.pop("eh_proj.weight")
        self.norm, self.head = w.pop("shared_head.norm.weight"), w.pop("shared_head.head.weight")
        self.embed = w.pop("embed_tokens.weight", main.model.embed_tokens.weight.detach())
        one = type(main.config)(**{**main.config.to_dict(), "num_hidden_layers": 1,
                                   "first_k_dense_replace": 0})
        self.block = AutoModelForCausalLM.from_config(one, dtype=torch.float32).eval()
        # the checkpoint names experts one by one; transformers' module holds them stacked
        experts = range(cfg["n_routed_experts"])
        pop = lambda e, p: w.pop(f"mlp.experts.{e}.{p}.weight")  # noqa: E731
        w["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((pop(e, "gate_proj"), pop(e, "up_proj"))) for e in experts])
        w["mlp.experts.down_proj"] = torch.stack([pop(e, "down_proj") for e in experts])
        missing = self.block.model.layers[0].load_state_dict(w, strict=False)
        assert not missing.missing_keys and not missing.unexpected_keys, missing
        self.block.model.norm = torch.nn.Identity()

    @torch.inference_mode()
    def __call__(self, next_tokens: list[int], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """next_tokens[i] = t_{i+1}, hidden[i] = h_i (positions 0..); returns the block's output
        h''_i and the logits for t_{i+2}."""
        e = rms_norm(self.embed[torch.tensor(next_tokens)], self.enorm, self.eps)
        x = torch.cat((e, rms_norm(hidden, self.hnorm, self.eps)), dim=-1) @ self.eh_proj.T
        out = self.block.model(inputs_embeds=x[None]).last_hidden_state[0]
        return out, rms_norm(out, self.norm, self.eps) @ self.head.T


# ---------------------------------------------------------------------------- forward

def test_mtp_forward_and_chained_drafts_match_the_reference(checkpoint, spec):
    main = mf.load_reference(checkpoint)
    ref = ReferenceMTP(checkpoint, main)
    engine = spec.engine
    prompt = mf.prompts()[2]                                           # 40 tokens: 3 blocks
    with torch.inference_mode():
        h = main.model(torch.tensor([prompt])).last_hidden_state[0]    # after the final norm
        first = int(main(torch.tensor([prompt])).logits[0, -1].argmax())
    # the layer itself, on the engine's cache: main model over the prompt, then MTP over pairs
    seq = Sequence("fwd", prompt, SamplingParams())
    seq.block_table = list(range(3))
    drafter = engine.drafter
    with torch.inference_mode():
        meta, _ = drafter._metadata([(seq, 0, len(prompt))])
        pos = torch.arange(len(prompt))
        hidden = engine.model(torch.tensor(prompt), pos, engine.kv_cache, meta)
        assert torch.allclose(hidden, h, atol=ATOL)
        out = drafter._forward(prompt[1:], hidden[:-1], [(seq, 0, len(prompt) - 1)])
        logits = engine.model.mtp.compute_logits(out)
    ref_out, ref_logits = ref(prompt[1:], h[:-1])
    assert torch.allclose(logits, ref_logits, atol=ATOL)
    assert torch.allclose(out, ref_out, atol=ATOL)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()

    # the drafter in the engine: after the prompt's step, draft 1 from (h_{n-1}, first token), draft
    # i+1 from the layer's own output at the previous position and draft i
    spec.engine.add_request("chain", params=SamplingParams(temperature=0, max_tokens=8),
                            prompt_token_ids=prompt)
    chained = spec.engine._seqs["chain"]
    while chained.num_output_tokens == 0:              # the prompt is prefilled in two chunks
        spec.engine.step()
    assert chained.token_ids[-1] == first
    spec.engine._draft()
    assert chained.draft_token_ids == reference_drafts(main, ref, chained.token_ids)
    spec.engine.abort_request("chain")
    assert spec.engine.stats().num_free_blocks == spec.engine.stats().num_total_blocks


def test_mtp_state_after_accepted_drafts_matches_the_reference(checkpoint, plain, spec, monkeypatch):
    """Drafts replaced by the true continuation are all accepted, so each step commits k+1 positions
    at once; the layer's KV and state must then be what the reference computes from scratch."""
    from pdcluster.engine.spec_decode.mtp import MtpDrafter
    main = mf.load_reference(checkpoint)
    prompt = mf.prompts(seed=4)[1]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    truth = prompt + plain.generate([prompt], params)[0].token_ids
    draft = MtpDrafter.draft

    def oracle(self, requests, keep_free):
        draft(self, requests, keep_free)                  # still runs the layer (its own KV)
        for seq, _ in requests:
            n = len(seq.draft_token_ids)
            seq.draft_token_ids = truth[seq.num_tokens:seq.num_tokens + n]

    engine = spec.engine
    before = engine.stats()
    monkeypatch.setattr(MtpDrafter, "draft", oracle)
    engine.add_request("oracle", params=params, prompt_token_ids=prompt)
    seq = engine._seqs["oracle"]
    while seq.num_output_tokens < 13:
        engine.step()
    monkeypatch.undo()
    stats = engine.stats()
    assert stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total >= 9
    assert stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total == (
        stats.spec_draft_tokens_total - before.spec_draft_tokens_total)
    assert seq.token_ids == truth[:seq.num_tokens]
    engine._draft()
    assert seq.draft_token_ids == reference_drafts(main, ReferenceMTP(checkpoint, main), seq.token_ids)
    engine.abort_request("oracle")
    assert_all_blocks_free(spec)


def reference_drafts(main, ref: ReferenceMTP, token_ids: list[int]) -> list[int]:
    """The k drafts after `token_ids` (whose last token has no KV yet): the layer at the last
    position with the main model's hidden state, then on its own output and draft."""
    with torch.inference_mode():
        h = main.model(torch.tensor([token_ids[:-1]])).last_hidden_state[0]
    tokens, hiddens, drafts = token_ids[1:], h, []
    out, logits = ref(tokens, hiddens)
    for _ in range(MTP["num_speculative_tokens"]):
        drafts.append(int(logits[-1].argmax()))
        tokens, hiddens = tokens + [drafts[-1]], torch.cat((hiddens, out[-1:]))
        out, logits = ref(tokens, hiddens)
    return drafts


def test_the_layer_has_its_own_kv_layer(checkpoint, plain, spec):
    assert spec.engine.model.num_layers == plain.engine.model.num_layers + 1
    assert spec.engine.kv_layout.num_layers == plain.engine.kv_layout.num_layers + 1


def test_checkpoint_embedding_copy_is_shared_and_models_without_mtp_are_refused(tmp_path, checkpoint):
    own = mf.save_mtp_model(mf.deepseek_config(), tmp_path / "own", seed=3, own_embedding=True)
    llm = LLM(model=str(own), speculative_config=MTP, **mf.ENGINE_KWARGS)
    assert llm.engine.model.mtp.embed_tokens is llm.engine.model.model.embed_tokens  # same values
    plain_ckpt = mf.save_model(mf.deepseek_config(), tmp_path / "plain", seed=3)  # config says 1
    with pytest.raises(ValueError, match="no MTP layer"):
        LLM(model=str(plain_ckpt), speculative_config=MTP, **mf.ENGINE_KWARGS)
    llama = mf.save_model(mf.llama_config(), tmp_path / "llama")
    with pytest.raises(ValueError, match="DeepSeek"):
        LLM(model=str(llama), speculative_config=MTP, **mf.ENGINE_KWARGS)
    with pytest.raises(ValueError, match="ngram"):
        LLM(model=str(checkpoint), speculative_config={**MTP, "prompt_lookup_max": 3})


# ---------------------------------------------------------------------------- exactness

def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_greedy_batch_with_chunks_and_a_prefix_hit_is_token_identical(plain, spec):
    batch = mf.prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    before = spec.engine.stats()
    expected = plain.generate(batch, params)
    got = spec.generate(batch, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    # the last prompt repeats 3 blocks of the 4th: MTP keeps the hit's blocks that are followed by
    # another matching one (a block's last MTP entry depends on the next token)
    assert expected[-1].num_cached_tokens == 48 and got[-1].num_cached_tokens == 32
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens_total > before.spec_draft_tokens_total
    assert_all_blocks_free(spec)


def test_preemption_with_a_tiny_pool_is_token_identical(checkpoint, plain):
    # 8 blocks of 16 tokens for 3 sequences that each end at ~60-80 tokens: must preempt
    tiny = LLM(model=str(checkpoint), speculative_config=MTP, **{**mf.ENGINE_KWARGS, "num_kv_blocks": 8},
               enable_prefix_caching=False)
    batch = [p[:40] for p in mf.prompts(seed=7)[1:4]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = plain.generate(batch, params)
    got = tiny.generate(batch, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert tiny.engine.stats().preemptions_total > 0
    assert_all_blocks_free(tiny)


def test_mostly_rejected_drafts_return_every_block(plain, spec):
    # random MTP weights: drafts are mostly wrong, every rejection trims the block table
    batch = mf.prompts(seed=11)[:4]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    before = spec.engine.stats()
    expected = plain.generate(batch, params)
    got = spec.generate(batch, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    stats = spec.engine.stats()
    drafted = stats.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    assert drafted > 0 and accepted < drafted / 2
    assert_all_blocks_free(spec)


# ---------------------------------------------------------------------------- PD handoff

class SharedStore:
    """An in-process store two engines share: `connector(engine)` is one engine's view of it."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}
        self.commits: dict[str, int] = {}

    def connector(self, engine):
        from pdcluster.engine.kv_connector import KVConnector
        store, cache = self, engine.kv_cache

        class Connector(KVConnector):
            def save(self, keys, block_ids, checksums):
                for key, b, crc in zip(keys, block_ids, checksums):
                    if key not in store.blocks:
                        store.blocks[key] = cache[b].clone()
                        if crc is not None:
                            store.commits[key] = crc
                return [True] * len(keys)

            def load(self, keys, block_ids):
                for key, b in zip(keys, block_ids):
                    if key in store.blocks:
                        cache[b].copy_(store.blocks[key])
                return [key in store.blocks for key in keys]

            def commit(self, keys, checksums):
                for key, crc in zip(keys, checksums):
                    store.commits.setdefault(key, crc)

            def committed(self, keys):
                return [store.commits.get(k) if k in store.blocks else None for k in keys]

        engine.set_kv_connector(Connector())


@pytest.fixture
def pd_pair(checkpoint, spec):
    """A prefill engine of its own and `spec` as the decode engine, sharing one store."""
    store = SharedStore()
    prefill = LLM(model=str(checkpoint), speculative_config=MTP, **mf.ENGINE_KWARGS)
    store.connector(prefill.engine)
    store.connector(spec.engine)
    yield store, prefill, spec
    spec.engine.set_kv_connector(None)


def test_pd_handoff_carries_the_mtp_kv_and_decode_keeps_speculating(pd_pair, plain):
    from pdcluster.cluster.kvstore.manifest import decode_handoff, encode_handoff
    store, prefill, decode = pd_pair
    batch = mf.prompts(seed=5)[:4]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    colocated = plain.generate(batch, params)       # (token-identical with speculation, see above)
    wires = {}
    for i, prompt in enumerate(batch):
        prefill.engine.add_request(f"pd-{i}", params=params, prompt_token_ids=prompt, kv_export=True)
    while prefill.engine.has_unfinished_requests():
        for out in prefill.engine.step():
            wires[out.request_id] = encode_handoff(out.kv_handoff)
    before = decode.engine.stats()
    got = {}
    for rid, wire in sorted(wires.items()):
        handoff = decode_handoff(wire)
        assert handoff.layout.num_mtp_layers == 1
        assert handoff.layout.num_layers == prefill.engine.model.num_hidden_layers + 1
        # prefill computed the MTP layer's KV at every prompt position (the last one with its first
        # token): nonzero entries in the MTP layer of every handed-off block
        for ref in handoff.blocks:
            mtp_kv = store.blocks[ref.key][-1, :ref.num_tokens]
            assert mtp_kv.abs().sum(dim=-1).gt(0).all()
        decode.engine.add_request(rid, params=params, prompt_token_ids=list(handoff.token_ids),
                                  kv_import=handoff)
        got[rid] = [handoff.first_token]
    while decode.engine.has_unfinished_requests():
        for out in decode.engine.step():
            got[out.request_id] += out.new_token_ids
    assert [got[f"pd-{i}"] for i in range(len(batch))] == [c.token_ids for c in colocated]
    after = decode.engine.stats()
    # decode computed no prompt token: only the KV of its own tokens (all but the last of each)
    assert after.kv_recomputed_tokens == before.kv_recomputed_tokens
    assert after.computed_tokens_total - before.computed_tokens_total == len(batch) * (16 - 1)
    assert after.spec_draft_tokens_total > before.spec_draft_tokens_total
    assert_all_blocks_free(decode)


def test_awq_mtp_layer_loads_like_the_main_layers(checkpoint, tmp_path):
    from pdcluster.engine.layers.quant import AWQLinearMethod
    # AWQ on every projection of every layer, the MTP layer's (eh_proj, attention, experts) included;
    # the dequantized twin holds exactly the values the packed tensors encode
    mf.quantize_checkpoint(checkpoint, tmp_path / "awq", tmp_path / "dense", "awq", 16,
                           mf.is_layer_linear, mf.awq_config(16))
    quant, dense = (LLM(model=str(tmp_path / name), speculative_config=MTP, **mf.ENGINE_KWARGS)
                    for name in ("awq", "dense"))
    q, d = quant.engine.model.mtp, dense.engine.model.mtp
    for name in ("eh_proj", "block.self_attn.q_a_proj", "block.mlp.experts.w13", "block.mlp.experts.w2"):
        assert isinstance(q.get_submodule(name).method, AWQLinearMethod), name
    assert torch.allclose(q.eh_proj.dense_weight(), d.eh_proj.dense_weight(), atol=1e-6)
    batch = mf.prompts(seed=9)[:3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert ([c.token_ids for c in quant.generate(batch, params)]
            == [c.token_ids for c in dense.generate(batch, params)])
    # the drafts (the MTP layer's argmax) agree as well
    sq, sd = quant.engine.stats(), dense.engine.stats()
    assert sq.spec_draft_tokens_total > 0
    assert (sq.spec_draft_tokens_total, sq.spec_accepted_tokens_total) == (
        sd.spec_draft_tokens_total, sd.spec_accepted_tokens_total)
