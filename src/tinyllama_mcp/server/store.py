"""The durable job queue: SQLite in WAL mode under the server home.

Every server process (each agent host may start its own over stdio) and every standalone worker
opens the same database. WAL lets readers run while one process writes; writes take SQLite's write
lock up front (`BEGIN IMMEDIATE`) so that claiming a job or a lease is atomic across processes.
Each `JobStore` is one connection guarded by one lock, so a store may be shared between threads.

Leases: one row per GPU slot. A worker owns a slot while its lease is unexpired and renews it with
heartbeats. A running job whose worker no longer holds its slot's lease is an orphan: the next
worker requeues it (it resumes from its newest checkpoint) or, after `max_attempts`, fails it with
the reasons of every attempt. Writes about a running job are fenced by the worker id, so a worker
that lost its lease cannot overwrite what its successor does.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.database import NEXT_SEQ, open_jobs_database

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
STAGES = ("sft", "dpo", "merge", "evaluate", "export")
JOB_ID_PATTERN = r"^(sft|dpo|merge|evaluate|export)-[0-9a-f]{12}$"
# What a succeeded job of each stage leaves in its folder (the worker checks it before marking success).
STAGE_OUTPUT = {"sft": "adapter", "dpo": "adapter", "merge": "merged", "evaluate": "evaluation", "export": "export"}

@dataclass(frozen=True)
class Job:
    id: str
    stage: str
    state: str
    name: Optional[str]
    spec: dict[str, Any]
    parents: list[str]
    job_dir: Path
    created_at: float
    updated_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    attempts: int
    max_attempts: int
    attempt_errors: list[str]
    error: Optional[str]
    cancel_requested: bool
    worker_id: Optional[str]
    slot: Optional[int]
    pid: Optional[int]
    host: Optional[str]
    progress: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"], stage=row["stage"], state=row["state"], name=row["name"],
            spec=json.loads(row["spec"]), parents=json.loads(row["parents"]), job_dir=Path(row["job_dir"]),
            created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], attempts=row["attempts"], max_attempts=row["max_attempts"],
            attempt_errors=json.loads(row["attempt_errors"]), error=row["error"],
            cancel_requested=bool(row["cancel_requested"]), worker_id=row["worker_id"], slot=row["slot"],
            pid=row["pid"], host=row["host"], progress=json.loads(row["progress"]), seq=row["seq"],
        )


@dataclass(frozen=True)
class Lease:
    slot: int
    worker_id: str
    pid: int
    host: str
    expires_at: float
    job_id: Optional[str]


class QueueFull(UserError):
    pass


class JobStore:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.db = open_jobs_database(Path(path), busy_timeout_s)
        self.path = self.db.path

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- reading
    def get(self, job_id: str) -> Optional[Job]:
        rows = self.db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def find_by_name(self, name: str) -> Optional[Job]:
        rows = self.db.query("SELECT * FROM jobs WHERE name = ?", (name,))
        return Job.from_row(rows[0]) if rows else None

    def recent(self, limit: int = 10) -> list[Job]:
        rows = self.db.query("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
        return [Job.from_row(row) for row in rows]

    def queued(self) -> list[Job]:
        rows = self.db.query("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")
        return [Job.from_row(row) for row in rows]

    def running(self) -> list[Job]:
        rows = self.db.query("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at")
        return [Job.from_row(row) for row in rows]

    def queue_position(self, job_id: str) -> Optional[int]:
        """1 for the next job a worker takes (ignoring jobs that wait for their parents)."""
        ids = [row["id"] for row in self.db.query("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")]
        return ids.index(job_id) + 1 if job_id in ids else None

    def newest_succeeded(self, stage: str) -> Optional[Job]:
        rows = self.db.query(
            "SELECT * FROM jobs WHERE stage = ? AND state = 'succeeded' ORDER BY finished_at DESC LIMIT 1", (stage,)
        )
        return Job.from_row(rows[0]) if rows else None

    def of_stage(self, stage: str, states: tuple[str, ...]) -> list[Job]:
        """Jobs of one stage in the given states, newest first (compare looks for an evaluation to reuse)."""
        marks = ", ".join("?" for _ in states)
        rows = self.db.query(f"SELECT * FROM jobs WHERE stage = ? AND state IN ({marks}) ORDER BY created_at DESC, "
                           "rowid DESC", (stage, *states))
        return [Job.from_row(row) for row in rows]

    def max_seq(self) -> int:
        return self.db.query("SELECT COALESCE(MAX(seq), 0) AS s FROM jobs")[0]["s"]

    def changes_since(self, seq: int) -> list[tuple[str, int]]:
        rows = self.db.query("SELECT id, seq FROM jobs WHERE seq > ? ORDER BY seq", (seq,))
        return [(row["id"], row["seq"]) for row in rows]

    def leases(self) -> list[Lease]:
        return [Lease(**dict(row)) for row in self.db.query("SELECT * FROM leases ORDER BY slot")]

    # ---------------------------------------------------------------- enqueue / cancel
    def enqueue(
        self, *, job_id: str, stage: str, spec: dict[str, Any], parents: list[str], job_dir: Path,
        name: Optional[str], max_attempts: int, max_queued: int, now: Optional[float] = None,
    ) -> Job:
        now = time.time() if now is None else now
        with self.db.write() as conn:
            queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= max_queued:
                raise QueueFull(
                    f"the queue already holds {queued} jobs (limit {max_queued}); wait for some to finish or "
                    "cancel one, or raise TINYLLAMA_MCP_MAX_QUEUED_JOBS"
                )
            if name is not None:
                taken = conn.execute("SELECT id FROM jobs WHERE name = ?", (name,)).fetchone()
                if taken:
                    raise UserError(f"output_name {name!r} is already used by job {taken[0]}; choose another name")
            conn.execute(
                f"INSERT INTO jobs (id, stage, state, name, spec, parents, job_dir, created_at, updated_at, "
                f"max_attempts, seq) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, {NEXT_SEQ})",
                (job_id, stage, name, json.dumps(spec), json.dumps(parents), str(job_dir), now, now, max_attempts),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def request_cancel(self, job_id: str, now: Optional[float] = None) -> tuple[str, Job]:
        """Cancel a queued job at once; flag a running one for its worker. Returns (previous state, job)."""
        now = time.time() if now is None else now
        with self.db.write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UserError(f"no job {job_id!r}; call status without job_id to list jobs")
            previous = row["state"]
            if previous == "queued":
                conn.execute(
                    f"UPDATE jobs SET state = 'cancelled', error = 'cancelled before it started', finished_at = ?, "
                    f"updated_at = ?, seq = {NEXT_SEQ} WHERE id = ?",
                    (now, now, job_id),
                )
            elif previous == "running":
                conn.execute(
                    f"UPDATE jobs SET cancel_requested = 1, updated_at = ?, seq = {NEXT_SEQ} WHERE id = ?",
                    (now, job_id),
                )
        job = self.get(job_id)
        assert job is not None
        return previous, job

    # ---------------------------------------------------------------- leases
    def acquire_lease(self, slot: int, worker_id: str, pid: int, host: str, ttl_s: float, now: Optional[float] = None) -> bool:
        """Take slot `slot` if it is free or its holder stopped heartbeating; renew it if already ours."""
        now = time.time() if now is None else now
        with self.db.write() as conn:
            row = conn.execute("SELECT worker_id, expires_at FROM leases WHERE slot = ?", (slot,)).fetchone()
            if row is not None and row["worker_id"] != worker_id and row["expires_at"] > now:
                return False
            conn.execute(
                "INSERT INTO leases (slot, worker_id, pid, host, expires_at, job_id) VALUES (?, ?, ?, ?, ?, NULL) "
                "ON CONFLICT (slot) DO UPDATE SET worker_id = excluded.worker_id, pid = excluded.pid, "
                "host = excluded.host, expires_at = excluded.expires_at, "
                "job_id = CASE WHEN leases.worker_id = excluded.worker_id THEN leases.job_id ELSE NULL END",
                (slot, worker_id, pid, host, now + ttl_s),
            )
            return True

    def renew_lease(self, slot: int, worker_id: str, ttl_s: float, now: Optional[float] = None) -> bool:
        """Heartbeat. False means the lease was lost (we stalled past its expiry and another worker took it)."""
        now = time.time() if now is None else now
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE slot = ? AND worker_id = ? AND expires_at > ?",
                (now + ttl_s, slot, worker_id, now),
            )
            return cur.rowcount == 1

    def release_lease(self, slot: int, worker_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM leases WHERE slot = ? AND worker_id = ?", (slot, worker_id))

    # ---------------------------------------------------------------- the worker's side
    def claim(self, slot: int, worker_id: str, host: str, now: Optional[float] = None) -> Optional[Job]:
        """Move the oldest runnable queued job to running for this worker, if it holds the slot's lease.

        A job waits while a parent (e.g. the SFT job a DPO job builds on) is unfinished, and fails
        at once when a parent failed or was cancelled, since it could never run.
        """
        now = time.time() if now is None else now
        if not self.db.query("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1"):
            return None  # the common idle case, answered without taking the write lock
        with self.db.write() as conn:
            lease = conn.execute(
                "SELECT 1 FROM leases WHERE slot = ? AND worker_id = ? AND expires_at > ?", (slot, worker_id, now)
            ).fetchone()
            if lease is None:
                return None
            for row in conn.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid").fetchall():
                parents = json.loads(row["parents"])
                states = {
                    r["id"]: r["state"]
                    for r in conn.execute(
                        f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(parents))})", parents
                    )
                } if parents else {}
                dead = [p for p in parents if states.get(p, "failed") in ("failed", "cancelled")]
                if dead:
                    reason = ", ".join(f"{p} {states.get(p, 'is missing')}" for p in dead)
                    conn.execute(
                        f"UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ?, "
                        f"seq = {NEXT_SEQ} WHERE id = ?",
                        (f"parent job {reason}; start this stage again once its parent succeeded", now, now, row["id"]),
                    )
                    continue
                if any(states.get(p) != "succeeded" for p in parents):
                    continue  # waits for its parents
                conn.execute(
                    f"UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?, "
                    f"worker_id = ?, slot = ?, host = ?, pid = NULL, seq = {NEXT_SEQ} WHERE id = ?",
                    (now, now, worker_id, slot, host, row["id"]),
                )
                conn.execute("UPDATE leases SET job_id = ? WHERE slot = ?", (row["id"], slot))
                job_id = row["id"]
                break
            else:
                return None
        return self.get(job_id)

    def set_pid(self, job_id: str, worker_id: str, pid: int) -> None:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE jobs SET pid = ? WHERE id = ? AND worker_id = ? AND state = 'running'", (pid, job_id, worker_id)
            )

    def update_progress(self, job_id: str, worker_id: str, progress: dict[str, Any], now: Optional[float] = None) -> bool:
        now = time.time() if now is None else now
        with self.db.write() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET progress = ?, updated_at = ?, seq = {NEXT_SEQ} "
                "WHERE id = ? AND worker_id = ? AND state = 'running'",
                (json.dumps(progress), now, job_id, worker_id),
            )
            return cur.rowcount == 1

    def finish(
        self, job_id: str, worker_id: str, state: str, error: Optional[str] = None, now: Optional[float] = None
    ) -> bool:
        """Record a running job's final state (succeeded, failed or cancelled)."""
        assert state in FINAL_STATES
        now = time.time() if now is None else now
        with self.db.write() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ?, pid = NULL, "
                f"seq = {NEXT_SEQ} WHERE id = ? AND worker_id = ? AND state = 'running'",
                (state, error, now, now, job_id, worker_id),
            )
            conn.execute("UPDATE leases SET job_id = NULL WHERE job_id = ? AND worker_id = ?", (job_id, worker_id))
            return cur.rowcount == 1

    def retry_or_fail(
        self, job_id: str, worker_id: str, reason: str, count_attempt: bool = True, now: Optional[float] = None
    ) -> Optional[str]:
        """After an attempt ended abnormally: queue the job again, or fail it once attempts run out.

        `count_attempt=False` is for interruptions that are not the job's fault (the worker was asked
        to stop): the attempt is given back. Returns the new state, or None if the job was not ours.
        """
        now = time.time() if now is None else now
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE id = ? AND worker_id = ? AND state = 'running'", (job_id, worker_id)
            ).fetchone()
            if row is None:
                return None
            state = self._requeue_or_fail(conn, row, reason, count_attempt, now)
            conn.execute("UPDATE leases SET job_id = NULL WHERE job_id = ? AND worker_id = ?", (job_id, worker_id))
            return state

    @staticmethod
    def _requeue_or_fail(conn: sqlite3.Connection, row: sqlite3.Row, reason: str, count_attempt: bool, now: float) -> str:
        attempts = row["attempts"] if count_attempt else max(row["attempts"] - 1, 0)
        errors = json.loads(row["attempt_errors"])
        if count_attempt:
            errors.append(f"attempt {attempts}: {reason}")
        if row["cancel_requested"]:
            state, error = "cancelled", "cancelled while running"
        elif attempts >= row["max_attempts"]:
            state, error = "failed", f"failed after {attempts} attempts: " + "; ".join(errors)
        else:
            state, error = "queued", None
        conn.execute(
            f"UPDATE jobs SET state = ?, error = ?, attempts = ?, attempt_errors = ?, pid = NULL, "
            f"finished_at = CASE WHEN ? = 'queued' THEN NULL ELSE ? END, updated_at = ?, seq = {NEXT_SEQ} "
            "WHERE id = ?",
            (state, error, attempts, json.dumps(errors), state, now, now, row["id"]),
        )
        return state

    def recover_orphans(self, ttl_s: float, now: Optional[float] = None) -> list[tuple[Job, str]]:
        """Requeue (or fail) running jobs whose worker no longer holds its slot's lease.

        Returns each orphan as it was, with its new state, so the caller can make sure no process of
        the dead attempt is left running before the job runs again.
        """
        now = time.time() if now is None else now
        recovered: list[tuple[Job, str]] = []
        with self.db.write() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs j WHERE state = 'running' AND NOT EXISTS ("
                " SELECT 1 FROM leases l WHERE l.slot = j.slot AND l.worker_id = j.worker_id AND l.expires_at > ?)",
                (now,),
            ).fetchall()
            for row in rows:
                reason = (
                    f"its worker (pid {row['pid'] or '?'} on {row['host'] or '?'}) stopped sending heartbeats "
                    f"for over {ttl_s:g} s (killed or crashed)"
                )
                recovered.append((Job.from_row(row), self._requeue_or_fail(conn, row, reason, True, now)))
        return recovered
