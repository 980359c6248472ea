"""Single-process inference engine: paged KV cache, continuous batching, chunked prefill.

Plain torch; never imports Ray. `LLM` is the offline API, `LLMEngine` the streaming step API.
"""
from .outputs import RequestOutput
from .sampling import SamplingParams

__all__ = ["SamplingParams", "RequestOutput", "LLM", "LLMEngine", "EngineConfig"]


def __getattr__(name: str):
    # Lazy: importing SamplingParams must not load torch models or tokenizers.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "LLMEngine":
        from .llm_engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from .config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
