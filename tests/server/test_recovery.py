"""Durability: restarts lose nothing, two servers share one queue, a killed worker's job resumes, cancel stops.

Server and worker processes here are real `tinyllama-mcp` processes on a shared home; the test
watches the queue database directly, as a second process would.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tests.server.support import TINY_SFT, error_text, read_events, serving, store_of, wait_for, wait_state

pytestmark = pytest.mark.slow


def _spawn(args: list[str], home: Path, log: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_LEASE_TTL_S": "3",
                   "TINYLLAMA_MCP_POLL_INTERVAL_S": "0.2", **env}
    return subprocess.Popen(["tinyllama-mcp", *args], env=environment, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(log, "ab"))


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def _enqueue(settings, count: int, **arguments) -> list[str]:
    async with serving(settings) as (client, _):  # worker off: the jobs only go into the queue
        ids = []
        for _ in range(count):
            result = await client.call_tool("start_sft", {**TINY_SFT, **arguments})
            assert not result.is_error, error_text(result)
            ids.append(result.structured_content["job_id"])
        return ids


async def test_two_servers_share_the_queue_and_one_resumes_the_job_of_the_other_after_kill_9(
    make_settings, home, tmp_path
):
    """Restart with jobs queued, two servers on one home, kill -9 of the one running a job.

    Nothing is lost, one job runs at a time, and the surviving server resumes the killed one's job
    from its newest checkpoint.
    """
    first, second = await _enqueue(make_settings(), 1, max_steps=24, save_steps=4, per_device_train_batch_size=2) \
        + await _enqueue(make_settings(), 1)
    # "Restart": the server that queued the jobs is gone; two hosts now each start a server on the same home.
    servers = [_spawn(["serve"], home, tmp_path / f"server{i}.log") for i in range(2)]
    store = store_of(home)
    job_dir = home / "jobs" / first
    most_running = 0

    def watch() -> None:
        nonlocal most_running
        most_running = max(most_running, len(store.running()))

    try:
        wait_for(lambda: watch() or any(e["event"] == "checkpoint" for e in read_events(job_dir)), 120,
                 "the first checkpoint")
        running = store.get(first)
        [lease] = store.leases()
        holder = next(server for server in servers if server.pid == lease.pid)
        survivor = next(server for server in servers if server is not holder)
        holder.send_signal(signal.SIGKILL)  # the host of that server vanished without a word
        holder.wait(timeout=10)
        # The job process must not outlive its worker (parent-death signal).
        wait_for(lambda: not _alive(running.pid), 5, "the orphaned job process to die")

        wait_for(lambda: watch() or (store.get(first).final and store.get(second).final), 180, "both jobs to finish")
        assert survivor.poll() is None
        [lease] = store.leases()
        assert lease.pid == survivor.pid  # the survivor took over the slot
    finally:
        for server in servers:
            if server.poll() is None:
                server.stdin.close()  # the host goes away: the server stops on end of input
        codes = [server.wait(timeout=30) for server in servers]
        jobs = [store.get(first), store.get(second)]
        store.close()
    assert codes.count(0) == 1 and codes.count(-signal.SIGKILL) == 1
    assert [job.state for job in jobs] == ["succeeded", "succeeded"], [job.error for job in jobs]
    assert most_running == 1  # one slot on this machine: never two jobs at once
    assert [job.attempts for job in jobs] == [2, 1]  # the killed attempt counts once; nothing ran twice at once
    assert "stopped sending heartbeats" in jobs[0].attempt_errors[0]
    starts = [e for e in read_events(job_dir) if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resume_step"] is None
    assert starts[1]["resume_step"] is not None and starts[1]["resume_step"] >= 4
    resumed = [e["step"] for e in read_events(job_dir) if e["event"] == "step" and e["time"] > starts[1]["time"]]
    assert resumed and resumed[0] > starts[1]["resume_step"] and resumed[-1] == 24


async def test_standalone_worker_hands_its_job_back_on_sigterm(make_settings, home, tmp_path):
    [job_id] = await _enqueue(make_settings(), 1, max_steps=100_000)
    store = store_of(home)
    worker = _spawn(["worker"], home, tmp_path / "worker.log")
    try:
        pid = wait_for(lambda: store.get(job_id).pid, 60, "the job process to start")
        assert store.leases()[0].pid == worker.pid
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    job = store.get(job_id)
    leases = store.leases()
    store.close()
    assert (job.state, job.attempts, job.pid) == ("queued", 0, None)
    assert leases == []  # released, so another worker starts at once
    assert not _alive(pid)


async def test_cancel_a_running_job_bad_data_fails_clearly_and_shutdown_requeues(make_settings, home):
    data = home / "data" / "chat.jsonl"
    data.write_bytes(SFT_SAMPLE.read_bytes())
    async with serving(make_settings(), run_worker=True) as (client, runtime):
        # The file changes after it was checked: the job fails once, with the pipeline's reason.
        bad = (await client.call_tool("start_sft", {**TINY_SFT, "dataset": str(data)})).structured_content["job_id"]
        data.write_text('{"messages": []}\n')
        failed = await wait_state(client, bad, timeout_s=120)
        assert failed["state"] == "failed" and failed["attempts"] == 1, failed
        assert "sha256" in failed["error"] and "Traceback" not in failed["error"]

        long = (await client.call_tool("start_sft", {**TINY_SFT, "max_steps": 100_000})).structured_content["job_id"]
        store = runtime.store
        wait_for(lambda: store.get(long).pid, 60, "the job process to start")
        pid = store.get(long).pid
        out = (await client.call_tool("cancel", {"job_id": long})).structured_content
        assert out["previous_state"] == "running" and out["cancel_requested"]
        cancelled = await wait_state(client, long, timeout_s=30)
        assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled while running"
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group is gone

        interrupted = (await client.call_tool("start_sft", {**TINY_SFT, "max_steps": 100_000})).structured_content["job_id"]
        wait_for(lambda: store.get(interrupted).pid, 60, "the job process to start")
        pid = store.get(interrupted).pid
    # The server stopped while the job ran: the job is queued again, the attempt given back.
    store = store_of(home)
    job = store.get(interrupted)
    store.close()
    assert (job.state, job.attempts, job.pid) == ("queued", 0, None)
    assert not _alive(pid)
