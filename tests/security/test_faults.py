"""Faults, the fast versions (the long random-kill soak is tests/soak/soak.py).

- kill -9 of the job process mid-SFT (its pid read from the store, as an operator or the OOM killer
  would hit it): the job is requeued, resumes from its newest complete checkpoint and succeeds with
  attempts == 2. While it runs, the job process's environment holds no bearer token.
- A full disk while saving: the job folder lives on a tiny tmpfs; the job fails with a clear
  "no space left" reason, the queue database stays intact and the server keeps serving (and a new
  start_sft on the full disk is refused with a clear error, not a crash).
The pipeline side of corrupt/partial checkpoints is in tests/pipeline/test_pipeline_resume.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.server.support import TINY_SFT, error_text, read_events, serving, wait_for, wait_state

pytestmark = pytest.mark.slow
SECRET = "fault-test-bearer-secret-77"


async def test_kill_9_of_the_job_process_requeues_and_resumes(make_settings, home, monkeypatch):
    monkeypatch.setenv("TINYLLAMA_MCP_TOKEN", SECRET)
    settings = make_settings(token=SECRET, max_attempts=3)
    async with serving(settings, run_worker=True) as (client, runtime):
        started = await client.call_tool("start_sft", {**TINY_SFT, "max_steps": 16, "save_steps": 4,
                                                       "per_device_train_batch_size": 2})
        job_id = started.structured_content["job_id"]
        job_dir = home / "jobs" / job_id
        store = runtime.store
        wait_for(lambda: any(e["event"] == "checkpoint" for e in read_events(job_dir)), 120, "the first checkpoint")
        job = store.get(job_id)
        assert job.state == "running" and job.pid
        environ = Path(f"/proc/{job.pid}/environ").read_bytes()
        assert SECRET.encode() not in environ and b"TINYLLAMA_MCP_TOKEN" not in environ
        os.killpg(job.pid, signal.SIGKILL)  # the whole job process group, without warning
        final = await wait_state(client, job_id, timeout_s=180)
        assert final["state"] == "succeeded", final
        assert final["attempts"] == 2, final
        assert "killed by SIGKILL" in final["attempt_errors"][0], final["attempt_errors"]
        starts = [e for e in read_events(job_dir) if e["event"] == "start"]
        assert len(starts) == 2 and starts[1]["resume_step"] and starts[1]["resume_step"] >= 4
        assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert not (job_dir / ".adapter.tmp").exists()  # the artifact was moved into place whole
        assert not (await client.call_tool("status", {})).is_error


@pytest.fixture
def small_disk(home):
    """home/jobs on a 3 MiB tmpfs (root only); skipped with the reason where mounting is not allowed."""
    jobs = home / "jobs"
    jobs.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root (and mount); not available here")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", f"tinyllama-test-{uuid.uuid4().hex[:6]}",
                          str(jobs)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {out.stderr.strip()}")
    try:
        yield jobs
    finally:
        subprocess.run(["umount", "-l", str(jobs)], capture_output=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


async def test_full_disk_while_saving_fails_clearly_and_keeps_the_queue(make_settings, home, small_disk):
    async with serving(make_settings(max_attempts=1), run_worker=True) as (client, runtime):
        # a blocker eats what remains, leaving room for the job's small files but not its checkpoints
        free = shutil.disk_usage(small_disk).free
        (small_disk / "blocker").write_bytes(b"\0" * max(0, free - 96 * 1024))
        started = await client.call_tool("start_sft", {**TINY_SFT, "max_steps": 4, "save_steps": 2})
        assert not started.is_error, error_text(started)
        job_id = started.structured_content["job_id"]
        final = await wait_state(client, job_id, timeout_s=180)
        assert final["state"] == "failed", final
        assert "no space left" in final["error"].lower(), final["error"]
        assert "Traceback" not in final["error"] and "\n" not in final["error"]

        # the disk fills up completely: a new job is refused with a clear reason, not a crash
        _fill(small_disk / "blocker-2")
        refused = await client.call_tool("start_sft", TINY_SFT)
        text = error_text(refused)
        assert "no space left" in text.lower() and text.startswith("Error executing tool start_sft: "), text

        # the queue database is intact and serves
        store = runtime.store
        assert store.get(job_id).state == "failed"
        assert [row[0] for row in store.db.query("PRAGMA integrity_check")] == ["ok"]
        listed = (await client.call_tool("status", {})).structured_content
        assert [job["job_id"] for job in listed["jobs"]] == [job_id] and listed["queue"] == []

        # space freed: the queue takes jobs again (the kill -9 test above shows a job running to the end)
        (small_disk / "blocker").unlink()
        (small_disk / "blocker-2").unlink()
        again = await client.call_tool("start_sft", TINY_SFT)
        assert not again.is_error, error_text(again)
        await client.call_tool("cancel", {"job_id": again.structured_content["job_id"]})
        assert [row[0] for row in store.db.query("PRAGMA integrity_check")] == ["ok"]
