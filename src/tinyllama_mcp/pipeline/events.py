"""events.jsonl: the job's progress as one JSON object a line (see docs/PIPELINE_CLI.md).

The server folds these into its job store; a person can `tail -f` them. Each line is
written whole and flushed at once; lines that matter after a crash are also fsynced.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

DURABLE = {"start", "checkpoint", "artifact", "end", "error"}


class EventLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        # A run killed mid-write (kill -9, OOM killer) leaves a torn last line. Appending straight after
        # it would glue the next run's first event (its `start`, with resume_step) onto that garbage,
        # and read_events would drop both: start on a new line instead.
        if self._file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")
                    self._file.flush()

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if event in DURABLE:
            os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        self._file.close()


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: report them as null rather than writing invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_events(path: Path) -> list[dict]:
    """All complete events; a torn last line (the process died mid-write) is skipped."""
    events = []
    if not path.exists():
        return events
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def make_callback(log: EventLog, summary: dict):
    """A transformers TrainerCallback that turns the Trainer's logs into step and checkpoint events."""
    from transformers import TrainerCallback

    from tinyllama_mcp.pipeline.checkpoints import mark_complete

    dpo_keys = {
        "rewards/chosen": "rewards_chosen",
        "rewards/rejected": "rewards_rejected",
        "rewards/margins": "reward_margin",
        "rewards/accuracies": "reward_accuracy",
    }

    class EventCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t0: Optional[float] = None
            self.step0 = 0
            self.tokens0 = 0
            self.last_time = 0.0
            self.last_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = self.last_time = time.time()
            self.step0 = state.global_step
            self.last_tokens = self.tokens0 = state.num_input_tokens_seen
            # Resumed from a checkpoint: the job's first loss is in its restored log history.
            earlier = [h for h in state.log_history if "loss" in h]
            if earlier:
                summary.setdefault("first_loss", earlier[0]["loss"])
                if "rewards/accuracies" in earlier[0]:
                    summary.setdefault("first_reward_accuracy", earlier[0]["rewards/accuracies"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now = time.time()
            if "loss" not in logs:  # the run's totals, or validation's figures (recipe.validation emits those)
                if "train_runtime" in logs:
                    summary["runtime_s"] = round(logs["train_runtime"], 3)
                return
            tokens = state.num_input_tokens_seen
            rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, tokens
            done = state.global_step - self.step0
            per_step = (now - self.t0) / done if done else None
            eta = per_step * (state.max_steps - state.global_step) if per_step else None
            fields = dict(
                step=state.global_step,
                total=state.max_steps,
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_s=round(rate, 1),
                eta_s=round(eta, 1) if eta is not None else None,
                epoch=logs.get("epoch"),
            )
            fields.update({ours: logs[theirs] for theirs, ours in dpo_keys.items() if theirs in logs})
            log.emit("step", **fields)
            summary.setdefault("first_loss", logs["loss"])
            summary["last_loss"] = logs["loss"]
            summary["steps"] = state.global_step
            if "reward_accuracy" in fields:
                summary.setdefault("first_reward_accuracy", fields["reward_accuracy"])
                summary["reward_accuracy"] = fields["reward_accuracy"]
            summary["tokens_seen"] = tokens  # the job's, restored on resume
            summary["tokens_this_run"] = tokens - self.tokens0  # what runtime_s (this run's) covers

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_complete(folder)
            log.emit("checkpoint", step=state.global_step, path=str(folder))

    return EventCallback()
