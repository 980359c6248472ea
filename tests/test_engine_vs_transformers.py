"""Our engine against transformers' reference on the embedded SmolLM2: same greedy tokens, close logprobs,
with all prompts in one continuous batch (packed, chunked, paged)."""
from __future__ import annotations

import pytest
import torch

from pdcluster.engine import SamplingParams
from pdcluster.engine.layers import cpu_linear

NEW_TOKENS = 24

USER_QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime. Keep it short, please, and use "
    "simple words that a child could follow.",
]
RAW_TEXTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a king who had three daughters. " * 12,
    "1, 2, 3, 4, 5,",
]


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    chats = [llm.chat_prompt([{"role": "user", "content": q}]) for q in USER_QUESTIONS]
    raws = [llm.tokenizer.encode(t) for t in RAW_TEXTS]
    out = chats + raws
    assert len({len(p) for p in out}) == len(out), "prompt lengths should all differ"
    assert max(len(p) for p in out) > 200   # spans many blocks and several prefill chunks
    return out


def _hf_greedy(hf_model, prompt: list[int], eos: int) -> tuple[list[int], list[torch.Tensor]]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos, output_logits=True,
                                return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(l[0].float(), -1) for l in out.logits]


@pytest.fixture(scope="module")
def hf_greedy(llm, hf_model, prompts) -> list[tuple[list[int], list[torch.Tensor]]]:
    eos = next(iter(llm.engine.eos_token_ids))
    return [_hf_greedy(hf_model, p, eos) for p in prompts]


@pytest.fixture(params=["as served", "float32 activations", "BLAS only"])
def matmuls(request, llm, monkeypatch) -> str:
    """As served: the default matmul_activations (auto: int16 on a CPU with AVX512-VNNI), where the
    block kernels are built taking every matmul here (8-sequence decode steps, 96-token prefill
    chunks, the LM head). float32 activations: every block layer on the float kernel instead, the
    layers' modules stepping. BLAS only: the dense weights, the reference path. Returns the
    activations the block layers take."""
    methods = [m.method for m in llm.engine.model.modules()
               if isinstance(getattr(m, "method", None), cpu_linear.BlockLinearMethod)]
    if request.param != "as served":   # every prompt computed on this path, none from the cache
        monkeypatch.setattr(llm.engine.block_manager, "enable_prefix_caching", False)
    if request.param == "BLAS only":
        for method in methods:
            monkeypatch.setattr(method, "rows", (1 << 30, 1 << 30))
        monkeypatch.setattr(llm.engine.model.model, "decode_layers", None)   # it calls the kernel
        return "float32"
    if request.param == "float32 activations" and llm.engine.matmul_activations != "float32":
        from pdcluster.engine.cpu_kernels import block_linear_kernel
        from pdcluster.engine.layers.interleaved_blocks import deinterleave
        kernel = block_linear_kernel()
        for method in methods:
            monkeypatch.setattr(method, "blocks", deinterleave(method.blocks))
            monkeypatch.setattr(method, "kernel", kernel)
            monkeypatch.setattr(method, "rows", (kernel.min_rows, cpu_linear.MAX_ROWS))
        monkeypatch.setattr(llm.engine.model.model, "decode_layers", None)
        return "float32"
    return llm.engine.matmul_activations


# log-probability error allowed against transformers: float32 matmuls differ from it only in
# summation order; int16 activations also round each layer's input to 16 bits per 32-wide block
# (~2e-5 of each matmul's output, measured ~2e-3 at most here after 30 layers)
ATOL = {"float32": 2e-3, "int16": 1e-2}


def test_batched_greedy_matches_transformers(llm, hf_greedy, prompts, matmuls):
    atol = ATOL[matmuls]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5))
    max_err = 0.0
    for prompt, got, (ref_tokens, ref_logprobs) in zip(prompts, ours, hf_greedy):
        assert got.token_ids == ref_tokens, llm.tokenizer.decode(prompt)[-60:]
        for lp, ref in zip(got.logprobs, ref_logprobs):
            max_err = max(max_err, abs(lp.logprob - ref[lp.token_id].item()))
            top_ids = [t for t, _ in lp.top]
            assert top_ids[0] == int(ref.argmax())
            ref_top = ref[torch.tensor(top_ids)]
            assert torch.allclose(torch.tensor([v for _, v in lp.top]), ref_top, atol=atol)
    # With float32 activations both sides compute in float32 from the same dequantized weights; they
    # differ only in summation order (packed batches, stacked q/k/v and gate/up matmuls, the block
    # kernel's tiles, paged attention), which over 30 layers moves log-probabilities by ~1e-5..1e-4.
    # 2e-3 (1e-2 with int16 activations) is far below any gap that flips a token.
    assert max_err < atol
    assert llm.engine.stats().num_running == 0


def test_prefill_logits_match_transformers(llm, hf_model, prompts):
    """Whole-prompt logits at the last position, for the longest prompt (several chunks)."""
    prompt = max(prompts, key=len)
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    ids = torch.tensor([t for t, _ in got.logprobs[0].top])
    vals = torch.tensor([v for _, v in got.logprobs[0].top])
    assert torch.equal(ids, ref.topk(20).indices)
    assert torch.allclose(vals, ref[ids], atol=2e-3)


def test_chat_template_matches_transformers(llm):
    from transformers import AutoTokenizer
    path = llm.engine.model_path
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert llm.chat_prompt(messages) == list(expected)


def test_greedy_chat_answer(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
