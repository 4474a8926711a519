"""Resume: kill -9 an SFT job mid-run, rerun `python -m tinyllama_mcp.pipeline run` on the same JOB_DIR, and it
continues from the checkpoint and ends where an uninterrupted run ends. A corrupt newest checkpoint
is set aside and the previous one used. Also the `quantization: "none"` path of the CLI, with rows
longer than max_length (a counted `warning` event).
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import EvalPromptsSpec

from pipeline_testlib import finish_cli, kill_group, sft_demo_spec, start_cli, write_spec

MAX_STEPS, SAVE_STEPS, MAX_LENGTH = 10, 4, 32


def resume_spec():
    return sft_demo_spec(
        SFT_SAMPLE,
        training={"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "max_length": MAX_LENGTH, "gradient_checkpointing": True},
        quant={"quantization": "none"},
        eval_prompts=EvalPromptsSpec(prompts=["Where do secrets live?"], max_new_tokens=8),
    )


def wait_for_event(proc, job_dir: Path, kind: str) -> bool:
    """Wait until events.jsonl has a `kind` event; -> whether the job is still running then."""
    from tinyllama_mcp.pipeline.events import read_events

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(e["event"] == kind for e in read_events(job_dir / "events.jsonl")):
            break
        time.sleep(0.02)
    return proc.poll() is None


def kill_after_first_checkpoint(proc, job_dir: Path) -> bool:
    """SIGKILL the job's process group as soon as events.jsonl shows a checkpoint; -> it was still running."""
    alive = wait_for_event(proc, job_dir, "checkpoint")
    kill_group(proc)
    return alive


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """Two at a time: (an uninterrupted run | a run killed after its first checkpoint), then
    (the killed one rerun | a copy of the finished one with its newest checkpoint truncated, rerun)."""
    root = tmp_path_factory.mktemp("resume")
    reference_dir = write_spec(root / "uninterrupted", resume_spec())
    killed_dir = write_spec(root / "killed", resume_spec())
    reference_proc, killed_proc = start_cli(reference_dir, env), start_cli(killed_dir, env)
    alive = kill_after_first_checkpoint(killed_proc, killed_dir)
    killed = finish_cli(killed_proc, killed_dir)
    reference = finish_cli(reference_proc, reference_dir).check_ok()
    assert alive, f"the job ended before it could be killed ({killed.returncode}):\n{killed.stderr[-3000:]}"
    assert killed.returncode == -9
    checkpoints = [e["step"] for e in killed.events if e["event"] == "checkpoint"]
    assert checkpoints == [SAVE_STEPS], f"killed too late: {checkpoints}"
    assert not killed.of("end") and not killed.of("error")

    corrupt_dir = write_spec(root / "corrupt", resume_spec())
    shutil.copytree(reference_dir / "checkpoints", corrupt_dir / "checkpoints")
    kept = sorted(int(p.name.split("-")[1]) for p in (corrupt_dir / "checkpoints").glob("checkpoint-*"))
    assert len(kept) >= 2 and kept[-1] == MAX_STEPS
    weights = corrupt_dir / "checkpoints" / f"checkpoint-{kept[-1]}" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Meanwhile, a third job is stopped the way the worker cancels one: SIGTERM to its process group.
    cancelled_dir = write_spec(root / "cancelled", resume_spec())
    resumed_proc, corrupt_proc = start_cli(killed_dir, env), start_cli(corrupt_dir, env)
    cancelled_proc = start_cli(cancelled_dir, env)
    cancelled_alive = wait_for_event(cancelled_proc, cancelled_dir, "step")
    kill_group(cancelled_proc, signal.SIGTERM)
    cancelled = finish_cli(cancelled_proc, cancelled_dir)
    resumed = finish_cli(resumed_proc, killed_dir).check_ok()
    corrupt = finish_cli(corrupt_proc, corrupt_dir).check_ok()
    assert cancelled_alive, f"the job ended before SIGTERM ({cancelled.returncode}):\n{cancelled.stderr[-3000:]}"
    return {
        "reference": reference, "checkpoint": checkpoints[-1],
        "resumed": resumed, "corrupt": corrupt, "corrupt_kept": kept, "cancelled": cancelled,
    }


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


@pytest.fixture(scope="module")
def resumed(runs):
    return runs["resumed"]


def steps_after_last_start(run) -> list[dict]:
    events = run.events
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    return [e for e in events[last_start:] if e["event"] == "step"]


def adapter_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(job_dir / "adapter" / "adapter_model.safetensors")


def test_uninterrupted_run_without_quantization(reference):
    start = reference.one("start")
    assert start["resume_step"] is None and start["total_steps"] == MAX_STEPS
    assert [s["step"] for s in reference.of("step")] == list(range(1, MAX_STEPS + 1))
    assert reference.one("end")["summary"]["steps"] == MAX_STEPS
    stack = (reference.job_dir / "adapter" / "stack.json").read_text()
    assert '"quantization": "none"' in stack


def test_rows_over_max_length_are_a_counted_warning(reference, tokenizer):
    import json

    over = 0
    for line in SFT_SAMPLE.read_text("utf-8").splitlines():
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        over += len(tokenizer(text, add_special_tokens=False)["input_ids"]) > MAX_LENGTH
    assert 0 < over < 32
    (warning,) = reference.of("warning")
    assert warning["message"].startswith(f"{over} of 32 rows are longer than max_length {MAX_LENGTH} tokens")
    kinds = [e["event"] for e in reference.events]
    assert kinds.index("warning") < kinds.index("start")  # reported before training starts
    lineage = json.loads((reference.job_dir / "lineage.json").read_text())
    assert lineage["datasets"][0]["token_lengths"]["over_max_length"] == over


def test_resume_continues_from_the_checkpoint(runs, resumed, reference):
    checkpoint = runs["checkpoint"]
    starts = resumed.of("start")
    assert [s["resume_step"] for s in starts] == [None, checkpoint]
    assert starts[1]["total_steps"] == MAX_STEPS
    after = steps_after_last_start(resumed)
    assert [s["step"] for s in after] == list(range(checkpoint + 1, MAX_STEPS + 1))
    end, reference_end = resumed.one("end")["summary"], reference.one("end")["summary"]
    assert end["steps"] == reference_end["steps"] == MAX_STEPS
    assert resumed.of("step")[-1]["step"] == reference.of("step")[-1]["step"]
    # The summary describes the job, not just the part after the restart ...
    assert end["first_loss"] == reference_end["first_loss"] == reference.of("step")[0]["loss"]
    assert end["tokens_seen"] == reference_end["tokens_seen"]
    # ... and its speed only the part this run computed.
    assert 0 < end["tokens_this_run"] < end["tokens_seen"]
    assert end["tokens_per_s"] == round(end["tokens_this_run"] / end["runtime_s"], 1)


def test_resumed_run_matches_the_uninterrupted_one(resumed, reference):
    """Same data order, optimizer, schedule and RNG after the restart: the same losses and weights."""
    expected = {s["step"]: s for s in reference.of("step")}
    for s in steps_after_last_start(resumed):
        assert s["loss"] == pytest.approx(expected[s["step"]]["loss"], rel=1e-4)
        assert s["learning_rate"] == pytest.approx(expected[s["step"]]["learning_rate"], rel=1e-6)
    ours, theirs = adapter_weights(resumed.job_dir), adapter_weights(reference.job_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


def test_corrupt_newest_checkpoint_is_skipped(runs, reference):
    """A copy of the finished job with a file of its newest checkpoint truncated: the rerun resumes from the one before."""
    run, kept = runs["corrupt"], runs["corrupt_kept"]
    newest, previous = kept[-1], kept[-2]
    assert run.one("start")["resume_step"] == previous
    assert [s["step"] for s in run.of("step")] == list(range(previous + 1, MAX_STEPS + 1))
    assert run.one("end")["summary"]["steps"] == MAX_STEPS
    assert (run.job_dir / "checkpoints" / f"broken-checkpoint-{newest}").is_dir()  # set aside, not deleted
    ours, theirs = adapter_weights(run.job_dir), adapter_weights(reference.job_dir)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


def test_sigterm_stops_the_job_with_a_reason(runs):
    """The worker cancels a job with SIGTERM to its group: exit 143, an `error` event, the reason last on stderr."""
    run = runs["cancelled"]
    assert run.returncode == 143, run.stderr[-3000:]
    error = run.one("error")
    assert error["exit_code"] == 143 and error["message"].startswith("stopped by SIGTERM")
    assert run.last_stderr_line == error["message"]
    assert run.of("step") and not run.of("end") and not (run.job_dir / "adapter").exists()
