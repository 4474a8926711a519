"""The SQLite queue: leases, claiming, orphans, attempts, cancel. Two stores on one file stand for two processes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.store import JobStore, QueueFull


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "queue.sqlite3"


def enqueue(store: JobStore, job_id: str, parents=(), name=None, max_queued=10, now=None, max_attempts=3):
    return store.enqueue(job_id=job_id, stage=job_id.split("-")[0], spec={"stage": job_id.split("-")[0]},
                         parents=list(parents), job_dir=Path("/jobs") / job_id, name=name,
                         max_attempts=max_attempts, max_queued=max_queued, now=now)


def test_wal_mode_and_jobs_survive_reopening(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=1.0)
    enqueue(store, "sft-000000000002", now=2.0)
    store.close()
    again = JobStore(db)
    assert again.db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert [job.id for job in again.queued()] == ["sft-000000000001", "sft-000000000002"]
    assert again.queue_position("sft-000000000002") == 2


def test_one_lease_per_slot_across_processes_and_takeover_after_expiry(db):
    a, b = JobStore(db), JobStore(db)
    assert a.acquire_lease(0, "A", 1, "h", ttl_s=10, now=100)
    assert not b.acquire_lease(0, "B", 2, "h", ttl_s=10, now=105)
    assert b.acquire_lease(1, "B", 2, "h", ttl_s=10, now=105)  # another slot is free
    assert a.renew_lease(0, "A", ttl_s=10, now=108)
    assert not b.acquire_lease(0, "B", 2, "h", ttl_s=10, now=117)
    assert b.acquire_lease(0, "B", 2, "h", ttl_s=10, now=119)  # A stopped heartbeating at 108 + 10
    assert not a.renew_lease(0, "A", ttl_s=10, now=120)  # A learns it lost the slot


def test_claim_needs_the_lease_and_takes_the_oldest(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=1.0)
    enqueue(store, "sft-000000000002", now=2.0)
    assert store.claim(0, "A", "h", now=50) is None  # no lease, no job
    store.acquire_lease(0, "A", 1, "h", ttl_s=10, now=50)
    job = store.claim(0, "A", "h", now=51)
    assert (job.id, job.state, job.attempts, job.worker_id) == ("sft-000000000001", "running", 1, "A")
    assert store.leases()[0].job_id == job.id


def test_concurrent_claims_never_hand_out_a_job_twice(db):
    enqueue(JobStore(db), "sft-000000000001")
    claimed = []

    def worker(slot: int) -> None:
        store = JobStore(db)
        store.acquire_lease(slot, f"W{slot}", slot, "h", ttl_s=30)
        job = store.claim(slot, f"W{slot}", "h")
        if job is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claimed == ["sft-000000000001"]


def test_children_wait_for_parents_and_fail_when_a_parent_fails(db):
    store = JobStore(db)
    store.acquire_lease(0, "A", 1, "h", ttl_s=1000, now=0)
    enqueue(store, "sft-000000000001", now=1)
    enqueue(store, "dpo-000000000002", parents=["sft-000000000001"], now=2)
    enqueue(store, "sft-000000000003", now=3)
    assert store.claim(0, "A", "h", now=4).id == "sft-000000000001"
    # the DPO job waits for its parent, so the next SFT job overtakes it
    assert store.claim(0, "A", "h", now=5).id == "sft-000000000003"
    assert store.claim(0, "A", "h", now=6) is None
    store.finish("sft-000000000001", "A", "failed", "boom", now=7)
    assert store.claim(0, "A", "h", now=8) is None
    dpo = store.get("dpo-000000000002")
    assert dpo.state == "failed" and "parent job sft-000000000001 failed" in dpo.error


def test_orphans_are_requeued_then_failed_with_every_reason(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=0, max_attempts=2)
    for attempt, worker in enumerate(("A", "B"), start=1):
        now = attempt * 100
        assert store.acquire_lease(0, worker, attempt, "h", ttl_s=10, now=now)
        assert store.claim(0, worker, "h", now=now + 1).attempts == attempt
        assert store.recover_orphans(ttl_s=10, now=now + 5) == []  # its worker is alive
        recovered = store.recover_orphans(ttl_s=10, now=now + 50)  # heartbeats stopped
        assert [(job.id, state) for job, state in recovered] == [
            ("sft-000000000001", "queued" if attempt == 1 else "failed")
        ]
    job = store.get("sft-000000000001")
    assert job.state == "failed" and job.attempts == 2
    assert job.error.startswith("failed after 2 attempts: attempt 1: its worker")
    assert "attempt 2: its worker" in job.error and len(job.attempt_errors) == 2


def test_a_worker_that_lost_its_lease_cannot_write(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=0)
    store.acquire_lease(0, "A", 1, "h", ttl_s=10, now=0)
    store.claim(0, "A", "h", now=1)
    store.recover_orphans(ttl_s=10, now=100)
    store.acquire_lease(0, "B", 2, "h", ttl_s=10, now=100)
    assert store.claim(0, "B", "h", now=101).worker_id == "B"
    assert not store.update_progress("sft-000000000001", "A", {"step": {"step": 99}})
    assert not store.finish("sft-000000000001", "A", "succeeded")
    assert store.retry_or_fail("sft-000000000001", "A", "late") is None
    job = store.get("sft-000000000001")
    assert (job.state, job.worker_id, job.progress) == ("running", "B", {})


def test_shutdown_gives_the_attempt_back(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=0)
    store.acquire_lease(0, "A", 1, "h", ttl_s=10, now=0)
    store.claim(0, "A", "h", now=1)
    assert store.retry_or_fail("sft-000000000001", "A", "shutdown", count_attempt=False) == "queued"
    job = store.get("sft-000000000001")
    assert job.attempts == 0 and job.attempt_errors == []


def test_cancel_queued_and_running(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", now=0)
    enqueue(store, "sft-000000000002", now=1)
    store.acquire_lease(0, "A", 1, "h", ttl_s=10, now=0)
    store.claim(0, "A", "h", now=1)
    previous, job = store.request_cancel("sft-000000000002")
    assert (previous, job.state) == ("queued", "cancelled")
    previous, job = store.request_cancel("sft-000000000001")
    assert (previous, job.state, job.cancel_requested) == ("running", "running", True)
    with pytest.raises(UserError, match="no job"):
        store.request_cancel("sft-00000000000f")


def test_queue_limit_and_unique_names(db):
    store = JobStore(db)
    enqueue(store, "sft-000000000001", name="first", max_queued=2)
    with pytest.raises(UserError, match="output_name 'first' is already used by job sft-000000000001"):
        enqueue(store, "sft-000000000002", name="first", max_queued=2)
    enqueue(store, "sft-000000000003", max_queued=2)
    with pytest.raises(QueueFull, match="the queue already holds 2 jobs .limit 2."):
        enqueue(store, "sft-000000000004", max_queued=2)


def test_changes_since_sees_writes_from_other_connections(db):
    a, b = JobStore(db), JobStore(db)
    start = a.max_seq()
    enqueue(b, "sft-000000000001")
    b.request_cancel("sft-000000000001")
    changes = a.changes_since(start)
    assert [job_id for job_id, _ in changes] == ["sft-000000000001"]
    assert changes[0][1] == start + 2


def test_a_database_from_before_evaluate_and_export_jobs_is_widened_in_place(db):
    import sqlite3

    from tinyllama_mcp.server.database import JOBS_SCHEMA

    old = JOBS_SCHEMA.replace("'sft', 'dpo', 'merge', 'evaluate', 'export'", "'sft', 'dpo', 'merge'")
    conn = sqlite3.connect(db)
    conn.executescript(old)  # the jobs table as it was made with three stages, one job in it
    conn.execute("INSERT INTO jobs (id, stage, state, spec, job_dir, created_at, updated_at, max_attempts, seq) "
                 "VALUES ('sft-000000000001', 'sft', 'queued', '{}', '/jobs/x', 1.0, 1.0, 3, 7)")
    conn.commit()
    conn.close()
    store = JobStore(db)
    assert [(job.id, job.seq) for job in store.queued()] == [("sft-000000000001", 7)]
    enqueue(store, "evaluate-000000000002", now=2.0)
    enqueue(store, "export-000000000003", now=3.0)
    assert [job.stage for job in store.queued()] == ["sft", "evaluate", "export"]
    assert JobStore(db).max_seq() == store.max_seq()  # opening again leaves the widened table as it is
