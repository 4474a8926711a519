"""DPO batches without padding compute (speed levers `padding_free` + `varlen_attention`, issue 4).

TRL's DPO pads its chosen and rejected rows to the longest row of the batch (its own padding-free mode is
disabled upstream); with answers of very different lengths, much of the decoder's work is padding. Here:

- `PackedPairsCollator` wraps TRL's preference collator and adds what packs the batch: the flat positions of
  the real tokens, their restarting position_ids and the sequence boundaries for varlen attention;
- `packing(model)` hooks the decoder (the backbone under TRL's fused LM head) so it runs on those real tokens
  only, as one row with varlen attention, and hands back hidden states in the padded layout, zero at pads.

TRL then scores the completion tokens as before (pads carry no label), for the policy and for the reference
(the same batch with the adapter off). Every real token sees exactly the tokens it saw in the padded batch.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from pipeline import fast, varlen_attention

PACKING_KEYS = ("packed_index", "packed_position_ids", "packed_padding")


@dataclass
class PackedPairsCollator:
    """TRL's right-padded preference batch plus PACKING_KEYS, cu_seq_lens_q/_k and max_length_q/_k.

    `width_multiple` (lever cuda_graphs): the packed row gets `packed_padding` pad tokens, a segment of their own,
    up to a multiple of it, and max_length_q/_k is the row's width, as in fast.PackedRowsCollator.
    """

    inner: Any
    width_multiple: int = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        rows, width = mask.shape
        lengths = mask.sum(dim=1)
        if not torch.equal(mask.bool(), torch.arange(width) < lengths[:, None]):
            raise ValueError("DPO packing expects right-padded rows (a mask of ones, then zeros)")
        lengths = lengths.tolist()
        total = sum(lengths)
        padded = fast.padded_width(total, self.width_multiple)
        segments = lengths + ([padded - total] if padded > total else [])
        batch["packed_index"] = torch.cat([torch.arange(n) + r * width for r, n in enumerate(lengths)])
        batch["packed_position_ids"] = torch.cat([torch.arange(n) for n in segments]).view(1, -1)
        batch["packed_padding"] = padded - total
        cu = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
        longest = padded if self.width_multiple else max(lengths)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return batch


@contextlib.contextmanager
def packing(model) -> Iterator[None]:
    """Inside the block, `model`'s decoder runs the batches of PackedPairsCollator packed, with varlen attention."""
    decoder = fast.decoder_of(model)
    packed: dict[str, Any] = {}

    def before(module, args, kwargs):
        index, positions, padding = (kwargs.pop(key, None) for key in PACKING_KEYS)
        if index is None:
            return None
        ids = kwargs.pop("input_ids") if "input_ids" in kwargs else args[0]
        packed.update(index=index, shape=ids.shape)
        real = ids.reshape(-1)[index]
        if padding:  # any token id: the padding is its own segment, and its outputs are dropped below
            real = torch.cat([real, real.new_zeros(padding)])
        kwargs.update(input_ids=real.view(1, -1), attention_mask=None, position_ids=positions)
        return (), kwargs

    def after(module, args, kwargs, output):
        if "index" not in packed:
            return None
        index, (rows, width) = packed.pop("index"), packed.pop("shape")
        hidden = output.last_hidden_state[0, : index.numel()]
        padded = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, index, hidden)
        output.last_hidden_state = padded.view(rows, width, -1)
        return output

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True)]
    try:
        with varlen_attention.use(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
