"""SFT micro-batches packed into rows (lever `padding_free`), one row with sequence boundaries for varlen attention
(lever `varlen_attention`), widths padded to a multiple for CUDA graphs (lever `cuda_graphs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinyllama_mcp.pipeline.speed import sync_free_loss
from tinyllama_mcp.pipeline.speed.estimates import padded_width

PACK_ROW_TOKENS = 2048  # packed rows without varlen attention hold at least this many tokens


def graph_attention_bound(segments: list[int], max_sequence: int, padding_most: int, width: int,
                          bounded: bool = True) -> int:
    """max_length_q/_k of a packed batch replayed as CUDA graphs: the longer of `max_sequence` (the stage's
    max_length; 0: unknown) and `padding_most` (the most a padding segment holds), or the width when that is
    smaller, unknown, or exceeded by a segment, or when not `bounded` (Plan.graph_attention_bound). Known before the
    run, it is the same int for most batches, so the graphs need no new int per batch; and the flash kernels launch a
    block per 128 tokens of it for every segment, so the width (up to ~10k tokens) would launch mostly blocks that
    find their segment ended and exit."""
    bound = max(max_sequence, padding_most)
    if not bounded or not max_sequence or max(segments, default=0) > bound:
        return width
    return min(bound, width)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: indices of sequences grouped into rows of at most `capacity` tokens.

    A sequence longer than `capacity` gets a row of its own (the data is truncated to max_length before).
    Within a row the original order is kept, so the result does not depend on ties.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


@dataclass
class PackedRowsCollator:
    """Collate SFT examples (`input_ids`, optional `labels`) into packed rows with restarting position_ids.

    Output: input_ids, labels (-100 on padding and on each sequence's first token, which must not be
    predicted from the previous sequence), position_ids; no attention_mask, so transformers derives the
    block-diagonal causal mask from position_ids. With `cu_seq_lens`, also the sequence boundaries of the
    flattened rows for variable-length attention (speed.varlen_attention): cu_seq_lens_q/_k (int32; a row's
    padding is a segment of its own) and max_length_q/_k (an int). With `loss_positions`, also the labelled
    positions and the real-token count that the sync-free loss takes from the CPU (speed.sync_free_loss).

    `width_multiple` (lever cuda_graphs): rows are padded to a multiple of it, and max_length_q/_k is a bound on
    every segment known before the run (graph_attention_bound, unless not `attention_bound`): the longer of
    `max_sequence` (the stage's max_length) and the width multiple (a padding segment is shorter), so a batch's
    shapes and ints are the same for every batch of one width.
    """

    pad_token_id: int
    capacity: int
    cu_seq_lens: bool = False
    width_multiple: int = 0
    loss_positions: bool = False
    max_sequence: int = 0
    attention_bound: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) if e.get("labels") is not None else list(e["input_ids"]) for e in examples]
        rows = pack_rows([len(x) for x in ids], self.capacity)
        width = padded_width(max(sum(len(ids[i]) for i in row) for row in rows), self.width_multiple)
        out_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
        out_pos = torch.zeros((len(rows), width), dtype=torch.long)
        bounds = [0]
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(ids[i])
                out_ids[r, at : at + n] = torch.tensor(ids[i])
                out_labels[r, at : at + n] = torch.tensor(labels[i])
                out_labels[r, at] = -100
                out_pos[r, at : at + n] = torch.arange(n)
                at += n
                bounds.append(r * width + at)
            # Padding continues the last sequence's positions: one more "sequence" only if there is padding,
            # and its labels are -100 either way.
            out_pos[r, at:] = torch.arange(width - at) + (out_pos[r, at - 1] + 1 if at else 0)
            if at < width:
                bounds.append((r + 1) * width)
        batch = {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}
        if self.cu_seq_lens:
            cu = torch.tensor(bounds, dtype=torch.int32)
            segments = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            longest = max(segments)
            if self.width_multiple:
                longest = graph_attention_bound(segments, self.max_sequence, self.width_multiple, width,
                                                self.attention_bound)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if self.loss_positions:  # lever sync_free_step: what the loss and the token count need, from the CPU
            batch.update(sync_free_loss.loss_positions(out_labels))
            batch[sync_free_loss.REAL_TOKENS] = int((out_ids != self.pad_token_id).sum())  # the Trainer's own rule
        return batch
