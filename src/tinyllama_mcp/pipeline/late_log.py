"""The Trainer's step log, read from the GPU one step late (part of lever `sync_free_step`, issue 4).

The Trainer logs a step right after its optimizer step: it reads the loss and the gradient norm from the GPU
with `.item()`, which waits for the step to finish. With the decoder layers replayed as CUDA graphs, the GPU is
then idle until the host has prepared the next step and its queue has refilled (H200: a run logging every 1,000
steps replayed 1.031x / 1.042x the steps of one logging every step, bench/results/
train_bench_H200_round15_log_and_inputs.json; this module's gain was 1.031x, train_bench_H200_round15_levers.json,
BENCHMARKS.md round 15). Here a due log is staged instead: the GPU copies the step's values
to pinned host memory behind the step's work, and the log is written at the end of the next step, when the
copy is long done, with the step, epoch and token count it had. Nothing is read early: logs, their order, the
`log_history` and the callbacks' `on_log` are the Trainer's, one step later in wall time.

A step that saves a checkpoint, evaluates or ends training logs at once (the staged step first), so a checkpoint's
trainer state and the run's final metrics hold every step.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# () -> (the GPU scalars of a step's own metrics, a function that records their values in trainer._metrics)
TakeMetrics = Callable[[], tuple[list[torch.Tensor], Callable[[list[float]], None]]]


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


def install(trainer, take_metrics: TakeMetrics, write_log: Callable[[dict, Optional[float]], None]) -> None:
    """Stage `trainer`'s due step logs and write each at the end of the next step.

    `take_metrics` hands over the stage's own per-step metrics still on the GPU (SFT's entropy and accuracy) and
    how to record them, so they are staged with the step they belong to. `write_log(logs, start_time)` writes a
    log whose metrics are recorded (TRL's `log`: it adds them and calls the Trainer's).
    """
    from transformers.trainer_pt_utils import nested_gather

    hf_maybe_log_save_evaluate = trainer._maybe_log_save_evaluate
    staged: list[_Staged] = []  # at most one

    def stage(self, tr_loss, grad_norm, learning_rate, start_time) -> None:
        metric_tensors, record = take_metrics()
        loss = nested_gather(tr_loss, self.args.parallel_mode).mean()
        scalars = [loss] + ([] if grad_norm is None else [torch.as_tensor(grad_norm, device=loss.device)])
        scalars += metric_tensors
        # float64 holds every value exactly as the Trainer would have read it (float32 tensors, Python floats)
        host, ready = _to_host(torch.stack([s.detach().to(loss.device, torch.float64).reshape(()) for s in scalars]))
        tr_loss -= tr_loss  # as the Trainer does once it has read it
        staged.append(_Staged(
            values=host, ready=ready, steps=self.state.global_step - self._globalstep_last_logged,
            has_grad_norm=grad_norm is not None,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
            start_time=start_time, step=self.state.global_step, epoch=self.state.epoch,
            tokens=self.state.num_input_tokens_seen, metrics=self._metrics["train"], record_metrics=record))
        self._metrics["train"] = type(self._metrics["train"])(list)  # the next steps' metrics start empty
        self._globalstep_last_logged = self.state.global_step
        self.store_flos()

    def write(self, entry: _Staged) -> None:
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
            write_log(logs, entry.start_time)
        finally:
            state.global_step, state.epoch, state.num_input_tokens_seen, self._metrics["train"] = now

    def maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                learning_rate=None):
        control = self.control
        due = control.should_log and self.state.global_step > self._globalstep_last_logged
        at_once = (control.should_save or control.should_evaluate or control.should_training_stop
                   or control.should_epoch_stop)
        previous = staged.pop() if staged else None
        if due and not at_once:
            stage(self, tr_loss, grad_norm, learning_rate, start_time)
            control.should_log = False  # (what the Trainer's on_log leaves)
        if previous is not None:
            should_log = self.control.should_log
            write(self, previous)
            self.control.should_log = should_log  # (the callbacks' on_log resets it: this step's log is still due)
        return hf_maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                          learning_rate=learning_rate)

    trainer._maybe_log_save_evaluate = types.MethodType(maybe_log_save_evaluate, trainer)
