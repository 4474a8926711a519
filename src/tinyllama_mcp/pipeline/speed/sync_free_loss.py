"""The SFT step without host syncs (speed lever `sync_free_step`).

With the decoder layers replayed as CUDA graphs (lever `cuda_graphs`) the GPU, not the host, sets the pace of a
step, and it stays busy only while the host keeps its queue filled. Every read of a GPU value on the host drains
that queue: the GPU then idles while the host prepares what comes next. TRL's SFT step reads the GPU ~20 times a
step (`python -m bench.sync_probe` lists them): its fused LM head selects the labelled positions with a boolean mask
(forward and backward), it reads the entropy, the token accuracy and the token counts it logs with `.item()`, the
Trainer counts real tokens on the GPU and checks every loss for NaN, and the batch is copied from pageable memory.

Here the collator lists the labelled positions on the CPU (`loss_positions`), so every shape is known before the
GPU runs, and `LinearCrossEntropy` scores only those positions through the frozen LM head in chunks, never holding
all the logits. The loss is TRL's: the summed negative log-likelihood of the labelled tokens over the step's
labelled-token count. TRL's metrics (entropy, token accuracy) are computed in the same chunks and kept on the GPU
until the step's log reads them, where the Trainer reads the loss and the gradient norm: those three are the only
reads of a step left, and speed.late_log makes them one step
late, from a copy the GPU makes behind the step, so no read waits for the step it is in. The real-token count
comes from the collator, by the Trainer's own rule (tokens that are not the pad token).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from tinyllama_mcp.pipeline.nn.llama import decoder_of

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


def chunk_scores(part: torch.Tensor, weight: torch.Tensor, wanted: torch.Tensor, with_grad: bool):
    """One chunk of LinearCrossEntropy: the summed NLL of `wanted` (n, 1) under softmax(part @ weight.T), the count
    of top-1 hits, the summed entropy, and (with_grad) the gradient of the NLL sum with respect to `part`.

    Written without in-place steps so that, compiled (lever torch_compile), inductor can fuse the softmax, the
    metrics and the gradient into a few passes over the logits; eager, each line is its own kernel."""
    logits = (part @ weight.T).float()
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = (log_norm - logits.gather(1, wanted)).sum()
    correct = (logits.argmax(dim=-1, keepdim=True) == wanted).sum()
    log_probs = logits - log_norm
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum()
    if not with_grad:
        return nll, correct, entropy, None
    hit = torch.arange(probs.shape[1], device=probs.device) == wanted  # softmax minus the one-hot target
    return nll, correct, entropy, torch.where(hit, probs - 1, probs).to(weight.dtype) @ weight


@functools.cache
def compiled_chunk_scores(backend: str = "inductor"):
    # dynamic: a step's last chunk has its own row count
    return torch.compile(chunk_scores, backend=backend, dynamic=True, fullgraph=True)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of -log softmax(hidden @ weight.T)[target], chunk by chunk, for a frozen LM head.

    Also returns, without gradients, the summed entropy of the predicted distributions and the count of tokens
    whose most likely prediction is the target (TRL's logged metrics). The gradient with respect to `hidden` is
    computed in the forward, chunk by chunk, while the chunk's logits are at hand (softmax minus one-hot, times
    the weight), so the backward only scales it: no logits are kept. The logits are the LM head's in the
    model's dtype, scored in fp32, as transformers' loss does. `scores`: chunk_scores or its compiled form.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scores=chunk_scores):
        if ctx.needs_input_grad[1]:  # (the stages never train the head: LoRA targets the decoder's projections)
            raise ValueError("LinearCrossEntropy scores a frozen LM head; this one is trained (use TRL's loss)")
        chunk = max(1, CHUNK_LOGIT_BYTES // (4 * weight.shape[0]))
        total, entropy, correct = (torch.zeros((), dtype=torch.float32, device=hidden.device) for _ in range(3))
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            nll, hits, spread, part_grad = scores(hidden[start : start + chunk], weight,
                                                  targets[start : start + chunk, None], grad is not None)
            total += nll
            correct += hits
            entropy += spread
            if grad is not None:
                grad[start : start + chunk] = part_grad
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(entropy, correct)
        return total, entropy, correct

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_entropy, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def unsupported(model) -> Optional[str]:
    """None when the LM head is one this loss computes exactly; else why TRL's loss must run instead.

    Called on the loaded model, before the Trainer is configured (the lever's Trainer settings follow from it)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (adapted or wrapped), not a plain linear layer"
    if head.bias is not None:
        return "the LM head has a bias"
    config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(config, name, None) is not None:
            return f"the model scales its logits ({name})"
    return None


class SyncFreeLoss:
    """Trainer mixin (an SFTTrainer's): with `self.plan.sync_free_step`, the sync-free loss, metrics and token count
    for batches that carry `loss_positions`. Other batches (evaluation asking for outputs, a collator without the
    positions) and a plan without the lever keep TRL's. With torch_compile (and `plan.compile_loss`) the loss's
    chunks run compiled by inductor. The GPU metrics wait in `_pending_metrics` until a log reads them."""

    def _sync_free(self) -> bool:
        return self.plan.sync_free_step

    @property
    def _pending_metrics(self) -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
        # (mode, entropy sum, top-1 count, labelled tokens) of each batch since the last log
        return self.__dict__.setdefault("_sync_free_pending", [])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._sync_free() or return_outputs or LOSS_INDEX not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        scores = compiled_chunk_scores() if self.plan.torch_compile and self.plan.compile_loss else chunk_scores
        forward = {k: v for k, v in inputs.items() if k not in OWN_KEYS}
        with self.accelerator.autocast():  # what accelerate wraps the model's own forward in (mixed precision)
            hidden = decoder_of(model)(**forward, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs[LOSS_INDEX])
        head = model.get_output_embeddings()
        total, entropy, correct = LinearCrossEntropy.apply(hidden, head.weight, inputs[LOSS_TARGETS], scores)
        labelled = inputs[LOSS_INDEX].numel()
        mode = "train" if self.model.training else "eval"
        self._pending_metrics.append((mode, entropy, correct, labelled))
        if mode == "train":  # TRL's count: the packed width, padding included
            self._total_train_tokens += inputs["position_ids"].size(1) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        count = num_items_in_batch if num_items_in_batch is not None else labelled
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages gradients
        return loss

    def _take_metrics(self):
        """The pending metrics' GPU scalars (entropy, correct, per batch), and how to record their values."""
        taken = list(self._pending_metrics)
        self._pending_metrics.clear()

        def record(values: list[float]) -> None:
            for (mode, _, _, labelled), entropy, correct in zip(taken, values[0::2], values[1::2]):
                self._metrics[mode]["entropy"].append(entropy / labelled if labelled else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(correct / labelled if labelled else 0.0)

        return [t for _, entropy, correct, _ in taken for t in (entropy, correct)], record

    def log(self, logs, start_time=None):
        # A log written at once (evaluation, a checkpoint's step, the last): the metrics are read here, where the
        # Trainer has just read the loss.
        tensors, record = self._take_metrics()
        if tensors:
            record(torch.stack(tensors).tolist())
        return self._log_recorded(logs, start_time)

    def _log_recorded(self, logs, start_time=None):
        """TRL's log, for a step whose own metrics are recorded already."""
        return super().log(logs, start_time)

    def _track_num_input_tokens(self, inputs):
        if (not self._sync_free() or REAL_TOKENS not in inputs
                or self.args.include_num_input_tokens_seen != "non_padding"):
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += inputs[REAL_TOKENS]
