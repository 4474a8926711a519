"""The Trainer's step log, read from the GPU one step late (part of lever `sync_free_step`).

The Trainer logs a step right after its optimizer step: it reads the loss and the gradient norm from the GPU
with `.item()`, which waits for the step to finish. With the decoder layers replayed as CUDA graphs, the GPU is
then idle until the host has prepared the next step and its queue has refilled. Here a due log is staged instead: the GPU copies the step's values
to pinned host memory behind the step's work, and the log is written at the end of the next step, when the
copy is long done, with the step, epoch and token count it had. Nothing is read early: logs, their order, the
`log_history` and the callbacks' `on_log` are the Trainer's, one step later in wall time.

A step that saves a checkpoint, evaluates or ends training logs at once (the staged step first), so a checkpoint's
trainer state and the run's final metrics hold every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class _Staged:
    values: torch.Tensor  # on the host: loss sum, [gradient norm], the stage's metrics
    ready: Optional[Any]  # a CUDA event behind the copy (None on a CPU)
    steps: int  # optimizer steps the loss sum covers
    has_grad_norm: bool
    learning_rate: float
    start_time: Optional[float]
    step: int
    epoch: Optional[float]
    tokens: int
    metrics: dict  # trainer._metrics["train"] as the step left it
    record_metrics: Callable[[list[float]], None]


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, Optional[Any]]:
    if not values.is_cuda:
        return values.clone(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class LateLog:
    """Trainer mixin: with `self.plan.sync_free_step` and `self.plan.log_one_step_late`, a due step log is staged
    and written at the end of the next step. It needs the trainer's `_take_metrics()` (the step's own metrics still
    on the GPU, and how to record them: speed.sync_free_loss) and `_log_recorded(logs, start_time)` (TRL's log for
    metrics recorded already)."""

    def _stage(self, tr_loss, grad_norm, learning_rate, start_time) -> _Staged:
        from transformers.trainer_pt_utils import nested_gather

        metric_tensors, record = self._take_metrics()
        loss = nested_gather(tr_loss, self.args.parallel_mode).mean()
        scalars = [loss] + ([] if grad_norm is None else [torch.as_tensor(grad_norm, device=loss.device)])
        scalars += metric_tensors
        # float64 holds every value exactly as the Trainer would have read it (float32 tensors, Python floats)
        host, ready = _to_host(torch.stack([s.detach().to(loss.device, torch.float64).reshape(()) for s in scalars]))
        tr_loss -= tr_loss  # as the Trainer does once it has read it
        entry = _Staged(
            values=host, ready=ready, steps=self.state.global_step - self._globalstep_last_logged,
            has_grad_norm=grad_norm is not None,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
            start_time=start_time, step=self.state.global_step, epoch=self.state.epoch,
            tokens=self.state.num_input_tokens_seen, metrics=self._metrics["train"], record_metrics=record)
        self._metrics["train"] = type(self._metrics["train"])(list)  # the next steps' metrics start empty
        self._globalstep_last_logged = self.state.global_step
        self.store_flos()
        return entry

    def _write_staged(self, entry: _Staged) -> None:
        if entry.ready is not None:
            entry.ready.synchronize()  # passed long ago: a step's work was queued behind it
        values = entry.values.tolist()
        loss, rest = values[0], values[1:]
        logs = {"loss": loss / entry.steps}
        if entry.has_grad_norm:
            logs["grad_norm"] = rest.pop(0)
        logs["learning_rate"] = entry.learning_rate
        self._total_loss_scalar += loss
        state = self.state
        now = (state.global_step, state.epoch, state.num_input_tokens_seen, self._metrics["train"])
        state.global_step, state.epoch, state.num_input_tokens_seen = entry.step, entry.epoch, entry.tokens
        self._metrics["train"] = entry.metrics
        try:
            entry.record_metrics(rest)
            self._log_recorded(logs, entry.start_time)
        finally:
            state.global_step, state.epoch, state.num_input_tokens_seen, self._metrics["train"] = now

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None):
        staged: list[_Staged] = self.__dict__.setdefault("_late_log_staged", [])  # at most one
        if self.plan.sync_free_step and self.plan.log_one_step_late:
            control = self.control
            due = control.should_log and self.state.global_step > self._globalstep_last_logged
            at_once = (control.should_save or control.should_evaluate or control.should_training_stop
                       or control.should_epoch_stop)
            previous = staged.pop() if staged else None
            if due and not at_once:
                staged.append(self._stage(tr_loss, grad_norm, learning_rate, start_time))
                control.should_log = False  # (what the Trainer's on_log leaves)
            if previous is not None:
                should_log = self.control.should_log
                self._write_staged(previous)
                self.control.should_log = should_log  # (the callbacks' on_log resets it: this step's log is due)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                                start_time, learning_rate=learning_rate)
