"""Speed levers for the SFT and DPO stages (issue 4): each one a TrainingSpec field that can be switched off.

- `padding_free` (SFT): each micro-batch's sequences are packed first-fit-decreasing into rows of at most
  `max_length` tokens, with `position_ids` restarting at every sequence and no attention mask; transformers
  then masks across the packed sequences (`masking_utils.find_packed_sequence_indices`), so no token sees
  another sequence. Same sequences per step, same loss tokens: the same gradient as the padded batch,
  with far fewer pad tokens computed. Rows (not one long row) keep attention cost at rows x max_length^2.
- `padding_free` (DPO): TRL's DPO padding-free is disabled upstream. Its batches are right-padded, and
  under causal attention no real token can see a pad to its right, so the attention mask is dropped
  (exact for every real token) and sdpa takes the flash kernel with native GQA instead of a masked kernel.
- `gradient_checkpointing: "auto"`: off when the estimated activations of one micro-batch fit in free GPU memory.
- `use_liger_kernel`: Liger's RMSNorm/RoPE/SwiGLU kernels (Triton, CUDA only: skipped on CPU with a note).
- `activation_offloading`: TRL's offloading of saved activations to pinned CPU memory (CUDA only).
- `precompute_ref_log_probs` (DPO): reference log-probs computed once, before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# Saved activations per token per decoder layer without checkpointing, in units of the compute dtype's
# size: ~16 x hidden + 8 x intermediate (LoRA dropout copies included). TinyLlama at b8 x 2048 in bf16:
# 155 KB/token/layer, 56 GB a step; stock HF + Liger measured 44 GiB (PERF_NOTES), so this errs high.
ACT_HIDDEN_FACTOR, ACT_INTERMEDIATE_FACTOR = 16, 8
PACK_ROW_TOKENS = 2048  # SFT packed rows hold at least this many tokens (attention cost grows with the row)
FREE_MEMORY_SHARE = 0.85  # leave room for the allocator's fragmentation and the optimizer states


@dataclass
class Levers:
    """What the stage actually does, after resolving 'auto' and what this machine can run."""

    padding_free: bool = False
    gradient_checkpointing: bool = True
    use_liger_kernel: bool = False
    activation_offloading: bool = False
    precompute_ref_log_probs: bool = False
    batch_size: int = 1  # micro-batch the Trainer runs (accumulation fused in when it fits max_tokens_per_batch)
    accumulation: int = 1
    notes: list[str] = field(default_factory=list)

    def config_kwargs(self) -> dict[str, Any]:
        """TrainingArguments fields of the levers (gradient checkpointing and the batch shape are set apart)."""
        return dict(use_liger_kernel=self.use_liger_kernel, activation_offloading=self.activation_offloading)

    def effective(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "padding_free": self.padding_free,
            "gradient_checkpointing": self.gradient_checkpointing,
            "use_liger_kernel": self.use_liger_kernel,
            "activation_offloading": self.activation_offloading,
            "precompute_ref_log_probs": self.precompute_ref_log_probs,
            "lever_notes": list(self.notes),
        }


def liger_available() -> Optional[str]:
    """None when Liger kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (Liger's kernels are Triton GPU kernels)"
    try:
        import liger_kernel  # noqa: F401
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return f"liger-kernel/triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def activation_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Estimated saved activations of one micro-batch of `tokens` tokens without gradient checkpointing."""
    size = torch.finfo(dtype).bits // 8
    per_layer = ACT_HIDDEN_FACTOR * config.hidden_size + ACT_INTERMEDIATE_FACTOR * config.intermediate_size
    return tokens * config.num_hidden_layers * per_layer * size


def free_memory_bytes() -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free


def resolve(t, stage: str, model_config, dtype: torch.dtype, *, rows: int) -> Levers:
    """Resolve the lever fields of a TrainingSpec for this stage and machine (call after loading the model)."""
    lv = Levers(padding_free=t.padding_free, activation_offloading=t.activation_offloading,
                batch_size=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps)

    # DPO runs chosen and rejected in one forward: twice the rows.
    per_sequence = t.max_length * (2 if stage == "dpo" else 1)
    step_sequences = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if t.max_tokens_per_batch and t.gradient_accumulation_steps > 1 and step_sequences * per_sequence <= t.max_tokens_per_batch:
        # Same sequences per optimizer step (the sampler's order is the same), one forward instead of several:
        # the Trainer normalizes an accumulated step by all its label tokens, so the gradient is the same.
        lv.batch_size, lv.accumulation = step_sequences, 1
        lv.notes.append(
            f"micro-batches fused: {t.per_device_train_batch_size} x {t.gradient_accumulation_steps} -> {step_sequences} x 1"
        )
    # Tokens in one micro-batch at most.
    tokens = lv.batch_size * per_sequence
    if t.gradient_checkpointing == "auto":
        need = activation_bytes(model_config, tokens, dtype)
        free = free_memory_bytes()
        if free is None:
            # CPU: memory is the host's; the tiny and small models this runs on fit, so skip the recompute.
            lv.gradient_checkpointing = need > 4 * 2**30
        else:
            lv.gradient_checkpointing = need > FREE_MEMORY_SHARE * free
        lv.notes.append(
            f"gradient_checkpointing auto -> {lv.gradient_checkpointing} (estimated activations "
            f"{need / 2**30:.1f} GiB for {tokens} tokens, free "
            f"{'n/a' if free is None else f'{free / 2**30:.1f} GiB'})"
        )
    else:
        lv.gradient_checkpointing = bool(t.gradient_checkpointing)

    if t.use_liger_kernel:
        why_not = liger_available()
        if why_not is None:
            lv.use_liger_kernel = True
        else:
            lv.notes.append(f"use_liger_kernel skipped: {why_not}")

    if lv.activation_offloading and not torch.cuda.is_available():
        lv.activation_offloading = False
        lv.notes.append("activation_offloading skipped: no CUDA device")

    if stage == "dpo":
        if t.precompute_ref_log_probs == "auto":
            # Precomputing pays when every row is used at least once; a short run over a large set would pay a
            # reference pass for rows it never trains on.
            if t.max_steps > 0:
                used = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps
            else:
                used = t.num_train_epochs * rows
            lv.precompute_ref_log_probs = used >= 2 * rows
        else:
            lv.precompute_ref_log_probs = bool(t.precompute_ref_log_probs)
    return lv


# ---------------------------------------------------------------- SFT: packed rows, no attention mask


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
    block-diagonal causal mask from position_ids.
    """

    pad_token_id: int
    capacity: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) if e.get("labels") is not None else list(e["input_ids"]) for e in examples]
        rows = pack_rows([len(x) for x in ids], self.capacity)
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
        out_pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(ids[i])
                out_ids[r, at : at + n] = torch.tensor(ids[i])
                out_labels[r, at : at + n] = torch.tensor(labels[i])
                out_labels[r, at] = -100
                out_pos[r, at : at + n] = torch.arange(n)
                at += n
            # Padding continues the last sequence's positions: one more "sequence" only if there is padding,
            # and its labels are -100 either way.
            out_pos[r, at:] = torch.arange(width - at) + (out_pos[r, at - 1] + 1 if at else 0)
        return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}


# ---------------------------------------------------------------- DPO: right padding without a mask


def drop_right_padding_mask(model) -> Any:
    """Forward pre-hook on the decoder: drop an attention mask that is only right padding.

    Under causal attention no real token sees a pad to its right, so the outputs at real tokens are
    unchanged; pads' outputs differ but carry no loss. Masks with holes or left padding are kept.
    Returns the hook handle (remove it before generating).
    """
    decoder = model
    for attr in ("get_base_model",):
        if hasattr(decoder, attr):
            decoder = getattr(decoder, attr)()
    decoder = getattr(decoder, "model", decoder)

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        if kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None:
            return None
        if bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool((mask[:, 0] == 1).all()):
            kwargs["attention_mask"] = None
            return args, kwargs
        return None

    return decoder.register_forward_pre_hook(hook, with_kwargs=True)
