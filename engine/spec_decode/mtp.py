"""MTP drafter: DeepSeek-V3's multi-token-prediction layer proposes each sequence's draft tokens.

The layer keeps its own KV in the paged cache (layer `num_hidden_layers` of the same blocks), slot i
holding its entry for position i: the main model's hidden state h_i with token i+1. After every main
step `catch_up` computes those entries for every position whose main KV the step committed (prompt
chunks included, so a handed-off prompt carries them), and keeps each sequence's last MTP output.
`draft` turns that output into the first draft, then runs the layer on its own output for the next.
"""
from __future__ import annotations

import torch

from ..block_manager import BlockManager
from ..distributed import broadcast_from_first
from ..layers.attention import AttentionMetadata, PrefillSegment
from ..scheduler import ScheduledSeq
from ..sequence import Sequence


class MtpDrafter:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_manager: BlockManager,
                 device: torch.device) -> None:
        self.mtp = model.mtp
        self.kv_cache = kv_cache
        self.bm = block_manager
        self.device = device

    # ------------------------------------------------------------------ after a main step
    @torch.inference_mode()
    def catch_up(self, order: list[ScheduledSeq], hidden: torch.Tensor,
                 sampled: list[ScheduledSeq], tokens: list[list[int]]) -> None:
        """order: the step's sequences in the runner's row order, hidden: the main model's output
        rows; sampled/tokens: the runner's result. Call before the engine advances the sequences."""
        new_tokens = {id(s): t for s, t in zip(sampled, tokens)}
        rows, ids, spans = [], [], []                  # spans: (seq, first position, count)
        row = 0
        for s in order:
            seq, start = s.seq, s.seq.num_computed_tokens
            new = new_tokens.get(id(s))
            # positions whose main KV this step commits: the step's own tokens (a prompt chunk, or the
            # last token) and the accepted drafts
            count = s.num_tokens - len(seq.draft_token_ids) + (len(new) - 1 if new else 0)
            rows += range(row, row + count)
            ids += (seq.token_ids[start + 1:] + (new or []))[:count]     # token i+1 for position i
            spans.append((seq, start, count))
            row += s.num_tokens
        if not spans:
            return
        out = self._forward(ids, hidden[torch.tensor(rows, device=hidden.device)], spans)
        at = 0
        for seq, start, count in spans:
            at += count
            seq.mtp_hidden = out[at - 1].clone()
            seq.mtp_position = start + count          # valid while num_computed_tokens equals it

    # ------------------------------------------------------------------ before a main step
    @torch.inference_mode()
    def draft(self, requests: list[tuple[Sequence, int]], keep_free: int) -> None:
        """Set seq.draft_token_ids to up to n tokens for each (seq, n). Draft i > 1 writes MTP KV at
        the position after the sequence's last token; blocks for that are only taken while
        `keep_free` blocks stay free (the main step may need them), otherwise it drafts fewer."""
        bs = self.bm.block_size
        active: list[tuple[Sequence, int]] = []
        for seq, n in requests:
            c = seq.num_computed_tokens
            if seq.mtp_hidden is None or seq.mtp_position != c:
                continue          # its MTP state is behind (KV imported, just resumed): next step
            room = len(seq.block_table) * bs - c
            if n - 1 > room:
                extra = self.bm.blocks_needed(c + n - 1) - len(seq.block_table)
                if self.bm.num_free_blocks - extra >= keep_free and self.bm.reserve(seq, c + n - 1):
                    room = n - 1
            active.append((seq, min(n, room + 1)))
        if not active:
            return
        seqs = [s for s, _ in active]
        hidden = torch.stack([s.mtp_hidden for s in seqs])
        drafts = self._greedy(hidden)
        for seq, d in zip(seqs, drafts):
            seq.draft_token_ids = [d]
        live = list(range(len(active)))
        for step in range(1, max(n for _, n in active)):
            live = [i for i in live if active[i][1] > step]
            rows = torch.tensor(live, device=hidden.device)
            out = self._forward([seqs[i].draft_token_ids[-1] for i in live], hidden[rows],
                                [(seqs[i], seqs[i].num_computed_tokens + step - 1, 1) for i in live])
            hidden[rows] = out.to(hidden.dtype)
            for i, d in zip(live, self._greedy(out)):
                seqs[i].draft_token_ids.append(d)

    # ------------------------------------------------------------------ internals
    def _greedy(self, hidden: torch.Tensor) -> list[int]:
        """The layer's most likely next tokens; every TP rank takes rank 0's, as the main model's
        inputs must agree."""
        return broadcast_from_first(self.mtp.compute_logits(hidden).argmax(dim=-1)).tolist()

    def _forward(self, ids: list[int], hidden: torch.Tensor,
                 spans: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Run the MTP layer over `spans` (seq, first position, count), whose token ids and main
        hidden states are `ids` / `hidden` in span order; returns its output rows in that order."""
        meta, perm = self._metadata(spans)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[perm]
        positions = torch.tensor([p for _, start, n in spans for p in range(start, start + n)],
                                 dtype=torch.long, device=dev)[perm]
        out = self.mtp(ids_t, hidden.to(dev)[perm], positions, self.kv_cache, meta)
        restored = torch.empty_like(out)
        restored[perm] = out
        return restored

    def _metadata(self, spans: list[tuple[Sequence, int, int]]) -> tuple[AttentionMetadata, torch.Tensor]:
        """Attention metadata with one-token spans as decode rows (first, as attention wants them)
        and longer ones as prefill segments; perm maps packed rows to span-order rows."""
        bs, dev = self.bm.block_size, self.device
        starts, at = [], 0
        for _, _, n in spans:
            starts.append(at)
            at += n
        decodes = [i for i, (_, _, n) in enumerate(spans) if n == 1]
        chunks = [i for i, (_, _, n) in enumerate(spans) if n > 1]
        perm: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        tables, lens, prefills = [], [], []
        for i in decodes + chunks:
            seq, start, n = spans[i]
            row = len(perm)
            perm += range(starts[i], starts[i] + n)
            for p in range(start, start + n):
                slot_blocks.append(seq.block_table[p // bs])
                slot_offsets.append(p % bs)
            end = start + n
            if n == 1:
                tables.append(seq.block_table[:start // bs + 1])
                lens.append(end)
            else:
                prefills.append(PrefillSegment(row, n, end, torch.tensor(
                    seq.block_table[:-(-end // bs)], dtype=torch.long, device=dev)))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        width = max((len(t) for t in tables), default=0)
        table_t = as_long([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)
        lens_t = as_long(lens)
        mask = torch.arange(width * bs, device=dev)[None, :] < lens_t[:, None]
        meta = AttentionMetadata(
            slot_blocks=as_long(slot_blocks), slot_offsets=as_long(slot_offsets),
            num_decode=len(tables), decode_block_tables=table_t, decode_mask=mask[:, None, None, :],
            decode_lens=lens_t, prefills=prefills)
        return meta, as_long(perm)
