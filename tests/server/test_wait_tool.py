"""The wait tool: it returns a job's status once the job has ended, sending its progress meanwhile, or says that it
timed out; with a real worker training tiny-demo, validation figures in the status it returns."""

from __future__ import annotations

import time

import pytest

from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

from tests.server.support import TINY_SFT, error_text, serving


@pytest.mark.slow  # a real job process (~15 s of training and validation, plus its imports)
async def test_wait_returns_when_the_job_succeeds_and_reports_progress(make_settings):
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with serving(make_settings(), run_worker=True) as (client, _):
        started = await client.call_tool("start_sft", {**TINY_SFT, "save_steps": 2,
                                                       "validation_dataset": str(SFT_SAMPLE)})
        assert not started.is_error, error_text(started)
        assert started.structured_content["validation_preflight"]["rows"] == 32
        assert "wait(job_id=" in started.structured_content["next_step"]
        job_id = started.structured_content["job_id"]
        waited = await client.call_tool("wait", {"job_id": job_id, "timeout_s": 300}, progress_callback=on_progress)
        assert not waited.is_error, error_text(waited)
        out = waited.structured_content
        status = (await client.call_tool("status", {"job_id": job_id})).structured_content["job"]

    assert out["timed_out"] is False and out["job"]["state"] == "succeeded", out["job"]
    assert out["waited_s"] < 300 and out["job"]["metrics"] == status["metrics"]
    assert updates, "no progress notification arrived"
    steps = [p for p, _, _ in updates]
    assert steps == sorted(set(steps)) and steps[-1] == 4 and all(total == 4 for _, total, _ in updates)
    assert all(m.startswith(f"{job_id} running") for _, _, m in updates), updates
    assert all("loss" in m for p, _, m in updates if p > 0), updates  # (step 0: started, no loss yet)
    # The validation figures of the checkpoints (steps 2 and 4) and of the full set, and the best checkpoint.
    metrics = status["metrics"]
    assert metrics["valid_loss"] > 0 and 0 <= metrics["valid_mean_token_accuracy"] <= 1
    assert metrics["valid_rows"] == metrics["full_valid_rows"] == 32
    assert metrics["full_valid_loss"] == metrics["valid_loss"]  # all 32 rows are the sample: the same weights
    assert status["best_checkpoint"]["step"] in (2, 4) and status["best_checkpoint"]["path"].endswith(
        f"checkpoint-{status['best_checkpoint']['step']}")
    assert status["summary"]["full_valid_loss"] == metrics["full_valid_loss"]


async def test_wait_on_a_queued_job_times_out_and_says_what_next(make_settings):
    async with serving(make_settings()) as (client, _):  # no worker: the job stays queued
        job_id = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
        t0 = time.monotonic()
        waited = await client.call_tool("wait", {"job_id": job_id, "timeout_s": 1})
        elapsed = time.monotonic() - t0
    assert not waited.is_error, error_text(waited)
    out = waited.structured_content
    assert out["timed_out"] is True and out["job"]["state"] == "queued" and 1 <= out["waited_s"] < 3
    assert elapsed < 5
    assert f"call wait(job_id='{job_id}') again" in out["hint"] and "No worker is alive" in out["hint"]


async def test_wait_refuses_unknown_jobs_and_long_timeouts(make_settings):
    async with serving(make_settings()) as (client, _):
        unknown = await client.call_tool("wait", {"job_id": "sft-0123456789ab"})
        too_long = await client.call_tool("wait", {"job_id": "sft-0123456789ab", "timeout_s": 601})
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert "no job 'sft-0123456789ab'" in error_text(unknown)
    assert "invalid arguments" in error_text(too_long) and "timeout_s" in error_text(too_long)
    assert tools["wait"].annotations.read_only_hint and "timed_out" in str(tools["wait"].output_schema)
