"""What an engine reports about itself: its load and totals (`EngineStats`), read by its worker
after every step and sent to the router as a dict. Plain data, no torch: a worker whose engine runs
in another process unpickles it without loading the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVCounters:
    """KV traffic of one engine (`EngineStats` extends it, so its fields appear there by name)."""
    kv_blocks_saved: int = 0
    kv_blocks_loaded: int = 0
    kv_bytes_saved: int = 0
    kv_bytes_loaded: int = 0
    kv_save_seconds: float = 0.0
    kv_load_seconds: float = 0.0
    kv_recomputed_tokens: int = 0          # handed-off prompt tokens that had to be recomputed
    kv_corrupt_blocks: int = 0
    kv_missing_blocks: int = 0
    store_prefix_hit_tokens: int = 0    # prompt tokens found in the store instead of computed


@dataclass(kw_only=True)
class EngineStats(KVCounters):
    """A snapshot of the engine's load and totals, with its KV traffic counters (flat, by name)."""
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    computed_tokens_total: int
    prefix_hit_tokens_total: int
    preemptions_total: int
    spec_draft_tokens_total: int         # draft tokens verified (speculative decoding)
    spec_accepted_tokens_total: int      # of those, accepted (emitted as the model's own tokens)
    spec_verifications_total: int        # verifications of one sequence's drafts (1 + accepted/this:
                                         # mean tokens per verification, the mean accepted length)
    # Prompt tokens computed, and the wall time of the steps that computed them: the router learns
    # the pool's prefill throughput from their deltas.
    prefill_tokens_total: int = 0
    prefill_seconds_total: float = 0.0
    num_loading_kv: int = 0                # admitted, waiting for their KV to arrive
    step_seconds: dict = field(default_factory=dict)     # model step time, LatencyHistogram form
    step_thread_seconds_total: float = 0.0  # model step time x the threads each step ran on
    kv_wait_seconds: dict = field(default_factory=dict)  # admission to KV in, per loaded request
