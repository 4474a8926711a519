"""Estimates the planner decides by: memory of activations and base copies, and what a run will train."""

from __future__ import annotations

import random
from typing import Optional

import torch

# Saved activations per token per decoder layer without checkpointing, in units of the compute dtype's size:
# ~16 x hidden + 8 x intermediate (LoRA dropout copies included); errs high against stock HF + Liger.
ACT_HIDDEN_FACTOR, ACT_INTERMEDIATE_FACTOR = 16, 8
PACKED_WIDTHS_SAMPLE = 20_000  # micro-batches drawn at most to count an SFT run's packed widths


def activation_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Estimated saved activations of one micro-batch of `tokens` tokens without gradient checkpointing."""
    size = torch.finfo(dtype).bits // 8
    per_layer = ACT_HIDDEN_FACTOR * config.hidden_size + ACT_INTERMEDIATE_FACTOR * config.intermediate_size
    return tokens * config.num_hidden_layers * per_layer * size


def projection_weights(config) -> int:
    """Weights of the 7 linear projections of every decoder layer (what NF4 quantizes)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = hidden * (q + 2 * kv) + q * hidden  # q, k, v, o
    return config.num_hidden_layers * (attention + 3 * hidden * inter)  # + gate, up, down


def planned_rows(epochs: float, rows: int, max_steps: int, sequences_per_step: int) -> float:
    """Rows the run will train: max_steps' worth of sequences, else its epochs over the data."""
    if max_steps > 0:
        return max_steps * sequences_per_step
    return epochs * rows


def planned_tokens(rows_trained: float, mean_tokens: Optional[float], max_length: int, stage: str) -> Optional[float]:
    """Real tokens the run will train, from the rows' mean length (None: unknown); DPO rows are pairs."""
    if not mean_tokens:
        return None
    return rows_trained * min(float(mean_tokens), max_length) * (2 if stage == "dpo" else 1)


def padded_width(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple` (0: unchanged)."""
    return -(-tokens // multiple) * multiple if multiple else tokens


def sft_packed_widths(lengths: list[int], max_length: int, batch: int, micro_batches: int, multiple: int,
                      seed: int = 0) -> int:
    """Distinct packed widths (multiples of `multiple`) that `micro_batches` SFT micro-batches of `batch` rows meet,
    each packed into one row as the varlen collator does; the rows drawn in random order, epoch after epoch, as the
    Trainer's sampler draws them (at most PACKED_WIDTHS_SAMPLE micro-batches)."""
    clipped = [min(n, max_length) for n in lengths]
    if not clipped or batch < 1:
        return 0
    rng, queue, widths = random.Random(seed), [], set()
    for _ in range(min(micro_batches, PACKED_WIDTHS_SAMPLE)):
        if len(queue) < batch:
            epoch = clipped[:]
            rng.shuffle(epoch)
            queue += epoch
        group, queue = queue[:batch], queue[batch:]
        widths.add(padded_width(sum(group), multiple))
    return len(widths)
