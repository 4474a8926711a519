"""speed.packing (lever padding_free, with varlen_attention and cuda_graphs' widths): SFT sequences packed into rows."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.speed.packing import PackedRowsCollator, pack_rows

from speed_testlib import sft_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 6], capacity=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 24 tokens need at least 3 rows of 10
    assert pack_rows([12, 1], capacity=10) == [[0], [1]]  # an over-long sequence gets a row of its own


def test_packed_collator_positions_and_labels():
    collate = PackedRowsCollator(pad_token_id=3, capacity=8)
    batch = collate([{"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
                     {"input_ids": [20, 21, 22, 23], "labels": [-100, 21, 22, 23]},
                     {"input_ids": [30, 31, 32, 33, 34, 35]}])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    ids, labels, pos = batch["input_ids"].tolist(), batch["labels"].tolist(), batch["position_ids"].tolist()
    assert len(ids) == 2 and len(ids[0]) == 7
    flat = {tuple(row[:]) for row in ids}
    assert (30, 31, 32, 33, 34, 35, 3) in flat
    for row_ids, row_labels, row_pos in zip(ids, labels, pos):
        for j, token in enumerate(row_ids):
            if token == 3:  # pad: no loss
                assert row_labels[j] == -100
            elif row_pos[j] == 0:  # a sequence's first token is never predicted from the one before
                assert row_labels[j] == -100
    row = ids.index([10, 11, 12, 20, 21, 22, 23])
    assert pos[row] == [0, 1, 2, 0, 1, 2, 3]
    assert labels[row] == [-100, 11, 12, -100, 21, 22, 23]


def test_packed_collator_sequence_boundaries_for_varlen():
    collate = PackedRowsCollator(pad_token_id=3, capacity=8, cu_seq_lens=True)
    batch = collate([{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21, 22, 23]}, {"input_ids": [30, 31, 32, 33, 34]}])
    ids = batch["input_ids"].tolist()
    assert ids == [[10, 11, 12, 30, 31, 32, 33, 34], [20, 21, 22, 23, 3, 3, 3, 3]]  # first-fit-decreasing
    # Every sequence is one segment of the flattened rows; a row's padding is a segment of its own.
    flat = batch["input_ids"].view(-1).tolist()
    cu = batch["cu_seq_lens_q"].tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == len(flat)
    segments = [flat[a:b] for a, b in zip(cu[:-1], cu[1:])]
    assert sorted(segments) == sorted([[10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34], [3, 3, 3, 3]])
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    one_row = PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True)(
        [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]}])
    assert one_row["input_ids"].shape == (1, 5) and one_row["cu_seq_lens_q"].tolist() == [0, 3, 5]
    # cuda_graphs: the width rounded up to the multiple, the padding its own segment, max_length the width
    padded = PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True, width_multiple=4)(
        [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]}])
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21, 3, 3, 3]]
    assert padded["labels"].tolist() == [[-100, 11, 12, -100, 21, -100, -100, -100]]
    assert padded["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and padded["max_length_q"] == 8
    # ... unless the stage's max_length is known: then max_length is a bound on every segment fixed before the run,
    # the longer of it and the multiple (which bounds the padding), where no segment exceeds it
    def bounded(lengths, max_sequence):
        return PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True, width_multiple=4,
                                  max_sequence=max_sequence)([{"input_ids": [9] * n} for n in lengths])
    assert bounded([3, 2], max_sequence=3)["max_length_q"] == bounded([3, 2], max_sequence=3)["max_length_k"] == 4
    assert bounded([3, 2], max_sequence=6)["max_length_q"] == 6
    assert bounded([5, 2], max_sequence=2)["max_length_q"] == 8  # a sequence longer than max_length: the width
    assert bounded([1, 1], max_sequence=6)["max_length_q"] == 4  # never more than the width


def test_packed_loss_equals_padded_loss(demo_model, tokenizer):
    examples = sft_examples(tokenizer, 6)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1
    width = max(lengths)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = demo_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        packed_batch = PackedRowsCollator(pad_token_id=pad, capacity=width + 150)(examples)
        assert packed_batch["input_ids"].shape[0] < len(examples)  # sequences really share rows
        packed = demo_model(**packed_batch).loss
        # Without the restarting positions (one long causal sequence) the loss would differ: the mask matters.
        leaky = dict(packed_batch)
        leaky.pop("position_ids")
        leaked = demo_model(**leaky).loss
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-5), (packed, padded)
    assert not torch.allclose(leaked, padded, rtol=1e-4, atol=1e-4)
