"""Which sequences run this step, and how many tokens each: continuous batching with chunked prefill.

Running sequences go first (decodes and unfinished prompt chunks), then waiting ones, all under one
token budget; a sequence whose KV is still arriving waits beside the batch, holding its blocks.
While a prompt that fits in half the budget waits to start, running prompt chunks take at most
the other half: it starts in the next step, and that step is short, instead of being queued behind
every chunk of a long one (vLLM's long_prefill_token_threshold serves the same end), unless it
begins with the block a running prompt is computing, which it then finds in the prefix cache.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int              # tokens computed for this sequence this step (drafts included)

    @property
    def completes(self) -> bool:
        """After this step the sequence's KV covers all its tokens (and drafts): sample its next
        token(s)."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_tokens == seq.num_tokens + len(seq.draft_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int,
                 on_admit: Callable[[Sequence], bool | None] | None = None) -> None:
        # on_admit may advance a newly admitted sequence's computed tokens by filling its blocks
        # from outside (KV handed off by a prefill worker, or prefix blocks found in a store); when
        # it returns True those blocks are still arriving: the sequence waits in `loading`, off the
        # batch, until `kv_arrived`.
        self.on_admit = on_admit
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []
        self.saving: list[Sequence] = []  # finished computing, blocks held until their KV is stored

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading or self.saving)

    def decode_batch(self) -> int:
        """Sequences the next step decodes, or 0 when it may compute prompt tokens (a running
        sequence with more than its next token to compute, or a newcomer whose KV is not handed
        over to be loaded)."""
        if any(seq.kv_import is None for seq in self.waiting):
            return 0
        if any(seq.num_tokens - seq.num_computed_tokens > 1 for seq in self.running):
            return 0
        return len(self.running)

    def kv_arrived(self, seq: Sequence) -> None:
        """A loading sequence's blocks are in: it joins the running batch."""
        self.loading.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def hold(self, seq: Sequence) -> None:
        """A running sequence leaves the batch but keeps its blocks while they are written out."""
        self.running.remove(seq)
        seq.status = SequenceStatus.SAVING
        self.saving.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chunk_budget = budget - self._newcomers_share(budget)  # for running sequences' prompt chunks
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            if seq.draft_token_ids:
                # Drafts are optional: cut them to the budget, and drop them unless the pool keeps a
                # block for each running sequence after this one, so they never cause a preemption.
                del seq.draft_token_ids[max(0, budget - remaining):]
                need = (self.bm.blocks_needed(seq.num_tokens + len(seq.draft_token_ids))
                        - len(seq.block_table) + len(self.running) - i - 1)
                if need > self.bm.num_free_blocks or not self.bm.reserve(
                        seq, seq.num_tokens + len(seq.draft_token_ids)):
                    seq.draft_token_ids.clear()
            n = min(remaining + len(seq.draft_token_ids), budget)
            if remaining > 1:   # a prompt chunk
                n = min(n, chunk_budget)
                if n == 0:
                    i += 1
                    continue
                chunk_budget -= n
            while not self.bm.reserve(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()          # newest first; never one already scheduled
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out    # the pool is full: admitting newcomers now would only thrash
        while (self.waiting and budget > 0
               and len(self.running) + len(self.loading) < self.max_num_seqs):
            seq = self.waiting[0]
            if not self.bm.admit(seq, budget):
                break
            if self.on_admit is not None and self.on_admit(seq):
                self.waiting.popleft()
                seq.status = SequenceStatus.LOADING
                self.loading.append(seq)
                continue
            # what the allocated blocks can take; reserve() may add blocks when the pool allows
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.reserve(seq, seq.num_computed_tokens + n):
                n = len(seq.block_table) * self.bm.block_size - seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if n > 0:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return out

    def _newcomers_share(self, budget: int) -> int:
        """Budget kept from running prompt chunks for the next prompt waiting to start: half of
        it, when that prompt fits in it (a long one waits its turn: starting each newcomer's long
        prompt at once would leave them all part-computed), the batch has room, and it does not
        begin as a running prompt whose next blocks it could find in the prefix cache by waiting.
        Handoffs take nothing (their KV is loaded, not computed)."""
        if len(self.running) + len(self.loading) >= self.max_num_seqs:
            return 0
        head = next((seq for seq in self.waiting if seq.kv_import is None), None)
        share = budget // 2
        if head is None or head.num_tokens - head.num_computed_tokens > share:
            return 0
        return 0 if self._would_find_in_cache(head) else share

    def _would_find_in_cache(self, seq: Sequence) -> bool:
        """Whether a running prompt is computing a block `seq` begins with (all blocks before it
        shared too): waiting a step, `seq` finds it in the prefix cache instead of computing it."""
        if not self.bm.enable_prefix_caching:
            return False
        bs = self.bm.block_size
        for other in self.running:
            if other.num_computed_tokens >= other.num_prompt_tokens:
                continue
            end = (other.num_computed_tokens // bs + 1) * bs  # through the block it is computing
            if end < seq.num_prompt_tokens and seq.token_ids[:end] == other.token_ids[:end]:
                return True
        return False

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the engine and give back its blocks (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        {SequenceStatus.RUNNING: self.running, SequenceStatus.WAITING: self.waiting,
         SequenceStatus.LOADING: self.loading, SequenceStatus.SAVING: self.saving}[seq.status].remove(seq)
        self.bm.release(seq)
        seq.draft_token_ids.clear()
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.bm.release(seq)
        seq.draft_token_ids.clear()
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
