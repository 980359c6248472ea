"""A Sequence owns one request's token ids, its block table and its progress through the engine."""
from __future__ import annotations

import enum
import itertools

import torch

from .sampling import SamplingParams
from .spec_decode.adaptive import DraftState

_arrival = itertools.count()


def generator_seed(seed: int) -> int:
    """The 32 bits a CPU torch.Generator keeps of a request's seed (any integer, taken modulo 2**64):
    mixed from all 64 (splitmix64's finalizer), where manual_seed keeps the low 32, so seeds 0 and
    2**32 draw different samples."""
    z = seed % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"    # admitted, blocks allocated, its KV still arriving from the store
    RUNNING = "running"
    SAVING = "saving"      # prefill done, its KV still being written to the store
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int | None = None) -> None:
        self.request_id = request_id
        self.max_tokens = max_tokens if max_tokens is not None else (params.max_tokens or 2**31)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = next(_arrival)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0          # tokens whose KV is in the cache
        self.num_cached_tokens = 0            # prompt tokens served by the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []   # hashes of the full blocks, in order
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.kv_export = False                # prefill-only: hand the KV off after one token
        self.kv_import = None                 # KVHandoff to pull from the store, if any
        # speculative decoding: tokens drafted after token_ids for this step's verification (never
        # part of token_ids, hashes or outputs until accepted), and how well drafts have done
        self.draft_token_ids: list[int] = []
        self.draft_state = DraftState()
        self.matcher = None                   # GrammarMatcher of a structured_output request
        # MTP drafting: the MTP layer's last output, valid while num_computed_tokens == mtp_position
        self.mtp_hidden: torch.Tensor | None = None
        self.mtp_position = -1
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(generator_seed(params.seed))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
