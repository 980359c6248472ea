"""Executes one scheduled step: packs the sequences' tokens (no padding), runs the model over the
paged KV cache, and samples the sequences whose KV now covers all their tokens.

A sequence carrying draft tokens computes its last token and the drafts, each as a decode row of its
own (query at position p attends to the keys 0..p, all written before attention runs), and is
sampled at every one of those positions, which verifies the drafts. Each row is then computed the
way plain decoding computes that position, through the same batched decode attention."""
from __future__ import annotations

import torch

from .distributed import broadcast_from_first
from .layers.attention import AttentionMetadata, PrefillSegment
from .outputs import TokenLogprob
from .sampler import sample
from .scheduler import ScheduledSeq
from .spec_decode.rejection import verify


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[list[int]],
                                                          list[list[TokenLogprob | None]]]:
        """Returns the sequences that were sampled, their new tokens (accepted drafts, then one
        token of the model's) and optional logprobs, one per new token."""
        # decodes (one token, or a verification's rows) first: one batched attention call per layer
        order = sorted(scheduled, key=lambda s: s.num_tokens != 1 and not s.seq.draft_token_ids)
        input_ids, positions, meta, sample_rows = self._prepare(order)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        to_sample = [s for s in order if s.completes]
        if not to_sample:
            return [], [], []
        logits = self.model.compute_logits(hidden[sample_rows]).cpu()
        seqs = [s.seq for s in to_sample]
        drafts = [s.seq.draft_token_ids for s in to_sample]
        if not any(drafts):
            flat, flat_lp = sample(logits, seqs)
            tokens, logprobs = [[t] for t in flat], [[lp] for lp in flat_lp]
        else:
            tokens, logprobs = verify(logits, seqs, drafts)
        # every TP rank must take rank 0's tokens: padded to one width for the broadcast
        width = max(len(t) for t in tokens)
        padded = torch.tensor([t + [-1] * (width - len(t)) for t in tokens], device=self.device)
        padded = broadcast_from_first(padded).tolist()
        tokens = [[x for x in row if x >= 0] for row in padded]
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
            if end > seq.num_tokens:                      # a verification: the drafts follow
                ids += seq.draft_token_ids[:end - seq.num_tokens]
            pos += range(start, end)
            for p in range(start, end):
                slot_blocks.append(seq.block_table[p // bs])
                slot_offsets.append(p % bs)
            nblocks = -(-end // bs)
            if s.num_tokens == 1 or seq.draft_token_ids:
                for p in range(start, end):
                    decode_tables.append(seq.block_table[:p // bs + 1])
                    decode_lens.append(p + 1)
            else:
                prefills.append(PrefillSegment(
                    row, s.num_tokens, end,
                    torch.tensor(seq.block_table[:nblocks], dtype=torch.long, device=self.device)))
            if s.completes:     # the last token and each draft: logits to verify them with
                sample_rows += range(len(ids) - 1 - len(seq.draft_token_ids), len(ids))
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
