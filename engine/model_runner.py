"""Executes one scheduled step: packs the sequences' tokens (no padding), runs the model over the
paged KV cache, and samples the sequences whose KV now covers all their tokens."""
from __future__ import annotations

import torch

from .distributed import broadcast_from_first
from .layers.attention import AttentionMetadata, PrefillSegment
from .outputs import TokenLogprob
from .sampler import sample
from .scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[int],
                                                          list[TokenLogprob | None]]:
        """Returns the sequences that were sampled, their new tokens and optional logprobs."""
        # decodes (one token) first: they share one batched attention call per layer
        order = sorted(scheduled, key=lambda s: s.num_tokens != 1)
        input_ids, positions, meta, sample_rows = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        to_sample = [s for s in order if s.completes]
        if not to_sample:
            return [], [], []
        logits = self.model.compute_logits(hidden[sample_rows])
        tokens, logprobs = sample(logits.cpu(), [s.seq for s in to_sample])
        tokens = broadcast_from_first(torch.tensor(tokens, device=self.device)).tolist()
        return to_sample, tokens, logprobs

    def _prepare(self, order: list[ScheduledSeq]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        sample_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSegment] = []
        for s in order:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            row = len(ids)
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            for p in range(start, end):
                slot_blocks.append(seq.block_table[p // bs])
                slot_offsets.append(p % bs)
            nblocks = -(-end // bs)
            if s.num_tokens == 1:
                decode_tables.append(seq.block_table[:nblocks])
                decode_lens.append(end)
            else:
                prefills.append(PrefillSegment(
                    row, s.num_tokens, end,
                    torch.tensor(seq.block_table[:nblocks], dtype=torch.long, device=self.device)))
            if s.completes:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        width = max((len(t) for t in decode_tables), default=0)
        tables = as_long([t + [0] * (width - len(t)) for t in decode_tables]).view(len(decode_tables), width)
        lens = as_long(decode_lens)
        mask = (torch.arange(width * bs, device=dev)[None, :] < lens[:, None])
        meta = AttentionMetadata(
            slot_blocks=as_long(slot_blocks), slot_offsets=as_long(slot_offsets),
            num_decode=len(decode_tables), decode_block_tables=tables,
            decode_mask=mask[:, None, None, :], decode_lens=lens, prefills=prefills)
        return as_long(ids), as_long(pos), meta, as_long(sample_rows)
