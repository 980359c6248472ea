"""Single-process inference engine: paged KV cache, continuous batching, chunked prefill.

Plain torch; never imports Ray. `LLM` is the offline API, `LLMEngine` the streaming step API.
"""
from pdcluster.engine.sampling import SamplingParams
from pdcluster.engine.outputs import RequestOutput

__all__ = ["SamplingParams", "RequestOutput", "LLM", "LLMEngine", "EngineConfig"]


def __getattr__(name: str):
    # Lazy: importing SamplingParams must not load torch models or tokenizers.
    if name == "LLM":
        from pdcluster.engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pdcluster.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from pdcluster.engine.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
