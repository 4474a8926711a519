"""DPO batches without padding compute (speed levers `padding_free` + `varlen_attention`).

TRL's DPO pads its chosen and rejected rows to the longest row of the batch (its own padding-free mode is
disabled upstream); with answers of very different lengths, much of the decoder's work is padding. Here:

- `PackedPairsCollator` wraps TRL's preference collator and adds what packs the batch: the flat positions of
  the real tokens, their restarting position_ids and the sequence boundaries for varlen attention;
- `packing(model)` hooks the decoder (the backbone under TRL's fused LM head) so it runs on those real tokens
  only, as one row with varlen attention, and hands back hidden states in the padded layout, zero at pads.

TRL then scores the completion tokens as before (pads carry no label), for the policy and for the reference
(the same batch with the adapter off). Every real token sees exactly the tokens it saw in the padded batch.
With `share_prompt`, a pair's common prompt is packed once and both answers attend to it (PackedPairsCollator):
TRL's chosen + rejected rows hold ~2 x prompt + both answers, the packed row one prompt + both answers.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from tinyllama_mcp.pipeline.nn.llama import decoder_of
from tinyllama_mcp.pipeline.speed import varlen_attention
from tinyllama_mcp.pipeline.speed.estimates import padded_width
from tinyllama_mcp.pipeline.speed.packing import graph_attention_bound

PACKING_KEYS = ("packed_index", "packed_position_ids", "packed_padding", "packed_targets", "packed_sources")


def shared_prefix(chosen: torch.Tensor, rejected: torch.Tensor) -> int:
    """How many leading tokens two rows share, leaving each at least one token of its own."""
    n = min(len(chosen), len(rejected)) - 1
    if n <= 0:
        return 0
    differ = (chosen[:n] != rejected[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


@dataclass
class PackedPairsCollator:
    """TRL's right-padded preference batch plus PACKING_KEYS, cu_seq_lens_q/_k and max_length_q/_k.

    Rows i and i + pairs of TRL's batch are pair i's chosen and rejected sequence. Packed, a pair is its chosen
    row then its rejected row; with `share_prompt` (lever of that name), the tokens both rows begin with (the
    prompt) are packed once, and the two answers attend to them: a query segment per part (prefix, chosen answer,
    rejected answer) and a key segment per part (prefix; prefix + chosen answer; prefix + rejected answer),
    gathered by `packed_key_index`. Causal attention aligned to each key segment's end (flash attention's
    convention when a segment has more keys than queries) lets answer token j see the prefix and answer tokens
    up to j: what it saw in its own row. A prefix token sees only the prefix, as in both rows.

    Keys: packed_index (the padded batch's flat position of each packed token), packed_position_ids,
    packed_targets / packed_sources (each real position of the padded batch and the packed token whose output
    it takes: a shared prefix feeds two rows), packed_key_index (with shared prefixes only).

    `width_multiple` (lever cuda_graphs): the packed row gets `packed_padding` pad tokens, a segment of their own,
    up to a multiple of it (the gathered keys too), and max_length_q/_k are bounds on every segment known before the
    run (packing.graph_attention_bound): the longer of `max_sequence` (the stage's max_length, which bounds a row) and
    the padding's most (the multiple for the queries, twice it for the keys), as in packing.PackedRowsCollator.
    """

    inner: Any
    width_multiple: int = 0
    share_prompt: bool = False
    max_sequence: int = 0
    attention_bound: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, width = mask.shape
        lengths = mask.sum(dim=1)
        if not torch.equal(mask.bool(), torch.arange(width) < lengths[:, None]):
            raise ValueError("DPO packing expects right-padded rows (a mask of ones, then zeros)")
        lengths = lengths.tolist()
        pairs = rows // 2
        index, positions, targets, sources, keys = [], [], [], [], []
        q_segments, k_segments = [], []
        at = 0  # packed position of the pair's first token
        for i in range(pairs):
            chosen, rejected = lengths[i], lengths[i + pairs]
            shared = shared_prefix(ids[i, :chosen], ids[i + pairs, :rejected]) if self.share_prompt else 0
            prefix = torch.arange(at, at + shared)
            chosen_part = torch.arange(at + shared, at + chosen)
            rejected_part = torch.arange(at + chosen, at + chosen + rejected - shared)
            chosen_row = torch.arange(chosen) + i * width  # the chosen row is packed whole: read and written back
            index += [chosen_row, torch.arange(shared, rejected) + (i + pairs) * width]
            positions += [torch.arange(chosen), torch.arange(shared, rejected)]
            targets += [chosen_row, torch.arange(rejected) + (i + pairs) * width]
            sources += [prefix, chosen_part, prefix, rejected_part]
            if shared:
                q_segments += [shared, chosen - shared, rejected - shared]
                k_segments += [shared, chosen, rejected]
                keys += [prefix, prefix, chosen_part, prefix, rejected_part]
            else:
                q_segments += [chosen, rejected]
                k_segments += [chosen, rejected]
                keys += [chosen_part, rejected_part]
            at += chosen + rejected - shared
        sharing = len(q_segments) > 2 * pairs
        # The gathered keys outnumber the queries by the shared prefixes: with a width multiple, the padding segment
        # has at least one query (and as many keys as round the keys up), so no query is left without keys.
        padded = padded_width(at + (1 if sharing and self.width_multiple else 0), self.width_multiple)
        if padded > at:
            q_segments.append(padded - at)
            positions.append(torch.arange(padded - at))
            if sharing:
                key_count = sum(k_segments)
                padded_keys = padded_width(key_count + padded - at, self.width_multiple)
                k_segments.append(padded_keys - key_count)
                keys.append(at + torch.arange(padded_keys - key_count) % (padded - at))
            else:
                k_segments.append(padded - at)
        batch["packed_index"] = torch.cat(index)
        batch["packed_position_ids"] = torch.cat(positions).view(1, -1)
        batch["packed_padding"] = padded - at
        batch["packed_targets"], batch["packed_sources"] = torch.cat(targets), torch.cat(sources)
        cu_q = torch.tensor([0, *itertools.accumulate(q_segments)], dtype=torch.int32)
        cu_k = torch.tensor([0, *itertools.accumulate(k_segments)], dtype=torch.int32) if sharing else cu_q
        if sharing:
            batch["packed_key_index"] = torch.cat(keys)
        longest_q, longest_k = max(q_segments), max(k_segments)
        if self.width_multiple:  # (the keys' padding rounds up the queries' padding and the shared prefixes)
            longest_q = graph_attention_bound(q_segments, self.max_sequence, self.width_multiple, padded,
                                              self.attention_bound)
            longest_k = graph_attention_bound(k_segments, self.max_sequence, 2 * self.width_multiple, int(cu_k[-1]),
                                              self.attention_bound)
        batch.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=longest_q, max_length_k=longest_k)
        return batch


@contextlib.contextmanager
def packing(model) -> Iterator[None]:
    """Inside the block, `model`'s decoder runs the batches of PackedPairsCollator packed, with varlen attention."""
    decoder = decoder_of(model)
    packed: dict[str, Any] = {}

    def before(module, args, kwargs):
        index, positions, padding, targets, sources = (kwargs.pop(key, None) for key in PACKING_KEYS)
        if index is None:
            return None
        ids = kwargs.pop("input_ids") if "input_ids" in kwargs else args[0]
        packed.update(targets=targets, sources=sources, shape=ids.shape)
        real = ids.reshape(-1)[index]
        if padding:  # any token id: the padding is its own segment, and its outputs are dropped below
            real = torch.cat([real, real.new_zeros(padding)])
        kwargs.update(input_ids=real.view(1, -1), attention_mask=None, position_ids=positions)
        return (), kwargs

    def after(module, args, kwargs, output):
        if "targets" not in packed:
            return None
        targets, sources, (rows, width) = packed.pop("targets"), packed.pop("sources"), packed.pop("shape")
        hidden = output.last_hidden_state[0].index_select(0, sources)  # a shared prefix's outputs, once per row
        padded = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, targets, hidden)
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
