"""The SFT step without host syncs (speed lever `sync_free_step`, issue 4).

The training step is bound by the CPU issuing ~1,000 kernels; it is only fast if the CPU can queue work
while the GPU runs. Every read of a GPU value on the host (a `.item()`, a boolean-mask index whose size
the host must know) drains that queue. TRL's SFT loss does this four times a micro-batch: its fused LM head
selects the labelled positions with a boolean mask (forward and backward), and it reads the entropy and the
token accuracy it logs with `.item()` (bench/results/sync_probe_sft_H200.txt).

Here the collator lists the labelled positions on the CPU (`loss_positions`), so every shape is known
before the GPU runs, and `LinearCrossEntropy` scores only those positions through the LM head in chunks,
never holding all the logits. The loss is TRL's: the summed negative log-likelihood of the labelled tokens
over the step's labelled-token count. TRL's extra metrics (entropy, token accuracy) are not computed.
The Trainer's count of real tokens comes from the collator too (`REAL_TOKENS`), not from the GPU.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

LOSS_INDEX, LOSS_TARGETS, REAL_TOKENS = "loss_index", "loss_targets", "real_tokens"
OWN_KEYS = (LOSS_INDEX, LOSS_TARGETS, REAL_TOKENS, "labels")  # batch keys the decoder does not take
CHUNK_LOGIT_BYTES = 2**29  # fp32 logits of one chunk: ~4k tokens at a 32k vocabulary


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flat positions (over rows x width) whose next token has a label, and those labels.

    A position predicts the next token of its own row, as a causal LM's shifted loss does.
    """
    rows, width = labels.shape
    following = labels[:, 1:]
    valid = following != -100
    index = (torch.arange(rows).view(-1, 1) * width + torch.arange(width - 1)).masked_select(valid)
    return {LOSS_INDEX: index, LOSS_TARGETS: following.masked_select(valid)}


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of -log softmax(hidden @ weight.T)[target], chunk by chunk, for a frozen LM head.

    The gradient with respect to `hidden` is computed in the forward, chunk by chunk, while the chunk's
    logits are at hand (softmax minus one-hot, times the weight), so the backward only scales it: no logits
    are kept. The logits are the LM head's in the model's dtype, scored in fp32, as transformers' loss does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, CHUNK_LOGIT_BYTES // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            part, wanted = hidden[start : start + chunk], targets[start : start + chunk, None]
            logits = (part @ weight.T).float()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (log_norm - logits.gather(1, wanted)).sum()
            if grad is not None:
                probs = logits.sub_(log_norm).exp_()
                probs.scatter_add_(1, wanted, probs.new_full(wanted.shape, -1.0))
                grad[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def unsupported(model) -> Optional[str]:
    """None when the LM head is one this loss computes exactly; else why TRL's loss must run instead."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (adapted or wrapped), not a plain linear layer"
    if head.bias is not None or head.weight.requires_grad:
        return "the LM head has a bias or is trained"
    config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(config, name, None) is not None:
            return f"the model scales its logits ({name})"
    return None


def install(trainer) -> None:
    """Give an SFTTrainer the sync-free loss and token count for batches that carry `loss_positions`.

    Other batches (and evaluation asking for outputs) keep TRL's loss.
    """
    from pipeline.fast import decoder_of

    trl_compute_loss, hf_track_tokens = trainer.compute_loss, trainer._track_num_input_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or LOSS_INDEX not in inputs:
            return trl_compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        forward = {k: v for k, v in inputs.items() if k not in OWN_KEYS}
        with self.accelerator.autocast():  # what accelerate wraps the model's own forward in (mixed precision)
            hidden = decoder_of(model)(**forward, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs[LOSS_INDEX])
        head = model.get_output_embeddings()
        total = LinearCrossEntropy.apply(hidden, head.weight, inputs[LOSS_TARGETS])
        count = num_items_in_batch if num_items_in_batch is not None else inputs[LOSS_INDEX].numel()
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages gradients
        return loss

    def track_tokens(self, inputs):
        if REAL_TOKENS not in inputs or self.args.include_num_input_tokens_seen != "non_padding":
            return hf_track_tokens(inputs)
        self.state.num_input_tokens_seen += inputs[REAL_TOKENS]

    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    trainer._track_num_input_tokens = types.MethodType(track_tokens, trainer)
