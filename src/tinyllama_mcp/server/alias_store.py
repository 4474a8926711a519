"""Named aliases (production, candidate, ...) in the job store's SQLite database, with every move kept.

`aliases` holds where each name points now; `alias_history` every move, oldest first. A move is one
`BEGIN IMMEDIATE` transaction that reads the current target, writes the new one and appends the history
row, so concurrent movers (threads or processes) never lose a row and the alias ends on the last writer's
target. A move also bumps the jobs it leaves and reaches, so watchers of jobs:// see their aliases change.
Rollback pops the stack of moves: each history row remembers which row becomes current if it is undone.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.database import NEXT_SEQ
from tinyllama_mcp.server.store import JobStore

# The jobs an alias leaves or reaches take the jobs' next change number (their status lists their aliases).
_BUMP_JOB = f"UPDATE jobs SET seq = {NEXT_SEQ} WHERE id = ?"


@dataclass(frozen=True)
class Alias:
    name: str
    target: str  # a job id, 'tiny-demo' or HF_LOCAL_MODEL_PATH's value
    seq: int  # the alias_history row that set it
    updated_at: float


@dataclass(frozen=True)
class AliasMove:
    id: int
    name: str
    target: str
    previous: Optional[str]
    action: str  # 'promote' or 'rollback'
    at: float
    reason: Optional[str]
    by: Optional[str]
    restores: Optional[int]  # the history row that becomes current when this one is rolled back


class AliasStore:
    """Aliases on the JobStore's own connection and lock (one connection per process, as the store keeps)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS aliases (
        name       TEXT PRIMARY KEY,
        target     TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS alias_history (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        name     TEXT NOT NULL,
        target   TEXT NOT NULL,
        previous TEXT,
        action   TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
        at       REAL NOT NULL,
        reason   TEXT,
        by       TEXT,
        restores INTEGER
    );
    CREATE INDEX IF NOT EXISTS alias_history_by_name ON alias_history (name, id);
    CREATE INDEX IF NOT EXISTS alias_history_by_target ON alias_history (target);
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        store.db.create(self.SCHEMA)

    # ---------------------------------------------------------------- reading
    def get(self, name: str) -> Optional[Alias]:
        rows = self.store.db.query("SELECT * FROM aliases WHERE name = ?", (name,))
        return Alias(**dict(rows[0])) if rows else None

    def all(self) -> list[Alias]:
        return [Alias(**dict(row)) for row in self.store.db.query("SELECT * FROM aliases ORDER BY name")]

    def pointing_at(self, target: str) -> list[str]:
        return [row["name"] for row in self.store.db.query("SELECT name FROM aliases WHERE target = ? ORDER BY name",
                                                         (target,))]

    def history(self, name: Optional[str] = None, limit: int = 1_000_000) -> list[AliasMove]:
        """Moves newest first: of one alias, or of all."""
        where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        rows = self.store.db.query(f"SELECT * FROM alias_history {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [AliasMove(**dict(row)) for row in rows]

    def moves_touching(self, target: str) -> list[AliasMove]:
        """Every move onto or off `target`, oldest first (its part of the alias history)."""
        rows = self.store.db.query("SELECT * FROM alias_history WHERE target = ? OR previous = ? ORDER BY id",
                                 (target, target))
        return [AliasMove(**dict(row)) for row in rows]

    def max_seq(self) -> int:
        return self.store.db.query("SELECT COALESCE(MAX(id), 0) AS s FROM alias_history")[0]["s"]

    def changes_since(self, seq: int) -> list[tuple[str, int]]:
        rows = self.store.db.query("SELECT name, id FROM alias_history WHERE id > ? ORDER BY id", (seq,))
        return [(row["name"], row["id"]) for row in rows]

    # ---------------------------------------------------------------- moving
    def promote(self, name: str, target: str, *, reason: Optional[str] = None, by: Optional[str] = None,
                now: Optional[float] = None) -> AliasMove:
        """Point `name` at `target` (creating it), one atomic write that appends the history row."""
        with self.store.db.write() as conn:
            current = conn.execute("SELECT target, seq FROM aliases WHERE name = ?", (name,)).fetchone()
            previous, restores = (current["target"], current["seq"]) if current else (None, None)
            return self._move(conn, name, target, previous, "promote", restores, reason, by, now)

    def rollback(self, name: str, *, expected: Optional[str] = None, reason: Optional[str] = None,
                 by: Optional[str] = None, now: Optional[float] = None) -> AliasMove:
        """Move `name` back to the target it had before its current one, recorded as a move of its own.
        `expected`: the earlier target the caller checked; another move in between makes this an error."""
        with self.store.db.write() as conn:
            current = conn.execute("SELECT target, seq FROM aliases WHERE name = ?", (name,)).fetchone()
            if current is None:
                raise UserError(f"there is no alias {name!r}; call aliases() to list them, or promote a model to it")
            row = conn.execute("SELECT restores FROM alias_history WHERE id = ?", (current["seq"],)).fetchone()
            earlier = conn.execute("SELECT target, restores FROM alias_history WHERE id = ?",
                                   (row["restores"],)).fetchone() if row["restores"] is not None else None
            if earlier is None:
                raise UserError(f"alias {name!r} has no earlier target to roll back to (its history holds nothing "
                                f"before {current['target']}); promote another model to it instead")
            if expected is not None and earlier["target"] != expected:
                raise UserError(f"alias {name!r} moved while rolling back (its earlier target is now "
                                f"{earlier['target']}); call aliases() to see it, then rollback again")
            return self._move(conn, name, earlier["target"], current["target"], "rollback", earlier["restores"],
                              reason, by, now)

    def earlier_target(self, name: str) -> Optional[str]:
        """Where rollback(name) would move the alias now; None when it has nowhere to go back to."""
        rows = self.store.db.query(
            "SELECT e.target FROM aliases a JOIN alias_history h ON h.id = a.seq "
            "JOIN alias_history e ON e.id = h.restores WHERE a.name = ?", (name,))
        return rows[0]["target"] if rows else None

    @staticmethod
    def _move(conn: sqlite3.Connection, name: str, target: str, previous: Optional[str], action: str,
              restores: Optional[int], reason: Optional[str], by: Optional[str], now: Optional[float]) -> AliasMove:
        now = time.time() if now is None else now
        cur = conn.execute(
            "INSERT INTO alias_history (name, target, previous, action, at, reason, by, restores) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (name, target, previous, action, now, reason, by, restores))
        seq = cur.lastrowid
        conn.execute(
            "INSERT INTO aliases (name, target, seq, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
            "SET target = excluded.target, seq = excluded.seq, updated_at = excluded.updated_at",
            (name, target, seq, now))
        for job_id in {target, previous} - {None}:
            conn.execute(_BUMP_JOB, (job_id,))  # a no-op for targets that are no job
        return AliasMove(id=seq, name=name, target=target, previous=previous, action=action, at=now,
                         reason=reason, by=by, restores=restores)
