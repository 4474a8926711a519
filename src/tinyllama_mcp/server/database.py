"""The SQLite file of the job store and the aliases: one connection in WAL mode guarded by one lock, and the jobs
schema with its one migration.

WAL lets readers run while one process writes; `write()` takes SQLite's write lock up front (`BEGIN IMMEDIATE`)
so that a transaction is atomic across processes. The lock makes one `Database` safe to share between threads.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Every change to a job takes the next value of one global counter, so a watcher can ask
# "what changed since N" across processes without trusting clocks.
NEXT_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs)"

JOBS_SCHEMA = """
    CREATE TABLE IF NOT EXISTS jobs (
        id               TEXT PRIMARY KEY,
        stage            TEXT NOT NULL CHECK (stage IN ('sft', 'dpo', 'merge', 'evaluate', 'export')),
        state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        name             TEXT UNIQUE,
        spec             TEXT NOT NULL,
        parents          TEXT NOT NULL DEFAULT '[]',
        job_dir          TEXT NOT NULL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        started_at       REAL,
        finished_at      REAL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        max_attempts     INTEGER NOT NULL,
        attempt_errors   TEXT NOT NULL DEFAULT '[]',
        error            TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        worker_id        TEXT,
        slot             INTEGER,
        pid              INTEGER,
        host             TEXT,
        progress         TEXT NOT NULL DEFAULT '{}',
        seq              INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
    CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs (seq);
    CREATE TABLE IF NOT EXISTS leases (
        slot       INTEGER PRIMARY KEY,
        worker_id  TEXT NOT NULL,
        pid        INTEGER NOT NULL,
        host       TEXT NOT NULL,
        expires_at REAL NOT NULL,
        job_id     TEXT
    );
"""


class Database:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so every transaction is explicit.
        self._conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from the start (atomic across processes)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def create(self, schema: str) -> None:
        """CREATE ... IF NOT EXISTS statements, run as one script."""
        with self._lock:
            self._conn.executescript(schema)


def open_jobs_database(path: Path, busy_timeout_s: float = 30.0) -> Database:
    db = Database(path, busy_timeout_s)
    _widen_stages(db)
    db.create(JOBS_SCHEMA)
    return db


def _widen_stages(db: Database) -> None:
    """Databases made before evaluate/export jobs existed check stage against three names; SQLite cannot alter a
    CHECK, so the table is rebuilt once, rows and seq kept, in one transaction (another process may be at it too)."""
    with db.write() as conn:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        if row is None or "'evaluate'" in row[0]:
            return
        conn.execute("ALTER TABLE jobs RENAME TO jobs_before_widen")
        conn.execute("DROP INDEX IF EXISTS jobs_by_state")
        conn.execute("DROP INDEX IF EXISTS jobs_by_seq")
        conn.execute(JOBS_SCHEMA.split(";")[0])  # CREATE TABLE jobs, the indexes follow in open_jobs_database
        conn.execute("INSERT INTO jobs SELECT * FROM jobs_before_widen")
        conn.execute("DROP TABLE jobs_before_widen")
