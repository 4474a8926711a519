"""speed.late_log (part of lever sync_free_step): the step log read from the GPU one step late, the Trainer's log."""

from __future__ import annotations

import json

import pytest

from speed_testlib import ON, run_stage, sft_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("accumulation, logging_steps, logged, staged_sizes", [
    (1, 1, [1, 2, 3, 4, 5], [4, 4, 4]),  # 3 (a checkpoint's) and 5 (the last) log at once
    (2, 2, [1, 2, 4], [4, 4, 6]),  # 4's log is written by the last step, which logs nothing of its own
])
def test_step_logs_written_one_step_late_are_the_trainers(tmp_path, monkeypatch, accumulation, logging_steps, logged,
                                                          staged_sizes):
    """speed.late_log: with the log staged on the GPU and written at the next step's end, the step events, the
    checkpoint's log history and the metrics are those of logs written at once; a checkpoint's step and the last
    step log at once, the others are staged. A staged log holds the loss sum, the gradient norm, and the entropy
    and correct count of each batch since the last log (the levers run the accumulation as one packed batch)."""
    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.speed import late_log

    staged = []
    to_host = late_log._to_host
    monkeypatch.setattr(late_log, "_to_host", lambda values: staged.append(len(values)) or to_host(values))
    runs = {}
    for late in (False, True):
        spec = sft_spec(dict(ON, sync_free_step=True))
        spec.training.max_steps, spec.training.save_steps = 5, 3
        spec.training.gradient_accumulation_steps, spec.training.logging_steps = accumulation, logging_steps
        summary, steps = run_stage(run_sft, spec, tmp_path / str(late), overrides={"log_one_step_late": late})
        state = json.loads(next((tmp_path / str(late)).rglob("checkpoint-3/trainer_state.json")).read_text())
        runs[late] = summary, steps, state["log_history"]
    assert staged == staged_sizes
    (at_once, at_once_steps, at_once_history), (late_summary, late_steps, late_history) = runs[False], runs[True]
    timing = {"time", "tokens_per_s", "eta_s", "train_runtime", "train_tokens_per_second"}
    assert [s["step"] for s in late_steps] == [s["step"] for s in at_once_steps] == logged
    for a, b in zip(at_once_steps, late_steps):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert [h["step"] for h in late_history] == [h["step"] for h in at_once_history] == [k for k in logged if k <= 3]
    for a, b in zip(at_once_history, late_history):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        assert {"entropy", "mean_token_accuracy", "num_tokens", "grad_norm"} <= b.keys()
    assert late_summary["first_loss"] == at_once["first_loss"] and late_summary["last_loss"] == at_once["last_loss"]
