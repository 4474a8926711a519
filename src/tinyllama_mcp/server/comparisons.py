"""Comparisons: which evaluate jobs answer a set of prompts, the blinded pairs of their answers, and the verdicts.

A comparison is one JSON file, settings.home/comparisons/<id>.json, written whole (write_atomic); judging reads,
changes and writes it under a file lock, so verdicts from several server processes are never lost. The blinding is
drawn once, when the comparison is made, with the system's random source: per pair which model is A, the order of
the pairs, and random pair ids. It never leaves the file until a pair is judged.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from random import SystemRandom
from typing import Any, Iterator, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.files import write_atomic

_RANDOM = SystemRandom()
_LOCK = threading.Lock()  # one process's threads; the file lock below covers other processes

try:  # POSIX; elsewhere the process lock alone guards the read-modify-write
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def new_id() -> str:
    return f"cmp-{secrets.token_hex(8)}"


def draw_pairs(prompts: int, models: int) -> list[dict[str, int | str]]:
    """One pair per (prompt, challenger), each challenger against model 0 (the baseline): A/B drawn per pair, the
    pairs shuffled, ids random (nothing about a pair's models can be read from its id or position)."""
    pairs, ids = [], set()
    for prompt in range(prompts):
        for challenger in range(1, models):
            pair_id = f"pair-{secrets.token_hex(6)}"
            while pair_id in ids:
                pair_id = f"pair-{secrets.token_hex(6)}"
            ids.add(pair_id)
            a, b = (0, challenger) if _RANDOM.random() < 0.5 else (challenger, 0)
            pairs.append({"pair_id": pair_id, "prompt": prompt, "a": a, "b": b})
    _RANDOM.shuffle(pairs)
    return pairs


def _folder(home: Path) -> Path:
    return home / "comparisons"


def _path(home: Path, comparison_id: str) -> Path:
    return _folder(home) / f"{comparison_id}.json"  # the id's pattern (cmp-<hex>) is checked by the input model


def create(home: Path, models: list[dict[str, Any]], prompts: list[str], evaluation: dict[str, Any]) -> dict:
    """Record a new comparison; returns it. `models`: [{ref, model, job_id, reused}], the baseline first."""
    record = {
        "comparison_id": new_id(), "created_at": time.time(), "models": models, "prompts": prompts,
        "evaluation": evaluation, "pairs": draw_pairs(len(prompts), len(models)), "verdicts": {},
    }
    try:
        _folder(home).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(_path(home, record["comparison_id"]), json.dumps(record, indent=2))
    except OSError as exc:
        raise UserError(f"could not write the comparison under {_folder(home)} ({exc.strerror or exc}); free space "
                        "or fix the permissions of the server home, then call compare again") from None
    return record


def load(home: Path, comparison_id: str) -> dict:
    path = _path(home, comparison_id)
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UserError(f"no comparison {comparison_id!r}; call compare(models=[...]) to make one") from None


@contextmanager
def _locked(home: Path, comparison_id: str) -> Iterator[None]:
    with _LOCK, open(_folder(home) / f".{comparison_id}.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def record_verdicts(home: Path, comparison_id: str, verdicts: dict[str, str]) -> dict:
    """Add `verdicts` ({pair_id: 'A'|'B'|'tie'}) to the comparison, replacing earlier ones of the same pairs."""
    load(home, comparison_id)  # a clear error for an unknown id before any lock file is made
    with _locked(home, comparison_id):
        record = load(home, comparison_id)
        known = {pair["pair_id"] for pair in record["pairs"]}
        unknown = sorted(set(verdicts) - known)
        if unknown:
            raise UserError(f"comparison {comparison_id} has no pair {unknown[:3]}; use the pair_ids compare_results "
                            "returned")
        record["verdicts"].update(verdicts)
        write_atomic(_path(home, comparison_id), json.dumps(record, indent=2))
    return record


def scores(record: dict) -> list[dict[str, Any]]:
    """Per model (baseline first): judged pairs it is in, wins, losses, ties, win rate with ties counting half."""
    tally = [{"model": m["model"], "judged": 0, "wins": 0, "losses": 0, "ties": 0} for m in record["models"]]
    for pair in record["pairs"]:
        winner = record["verdicts"].get(pair["pair_id"])
        if winner is None:
            continue
        for side, index in (("A", pair["a"]), ("B", pair["b"])):
            row = tally[index]
            row["judged"] += 1
            row["ties" if winner == "tie" else "wins" if winner == side else "losses"] += 1
    for row in tally:
        row["win_rate"] = (row["wins"] + row["ties"] / 2) / row["judged"] if row["judged"] else None
    return tally


def unblinded(record: dict) -> list[dict[str, Optional[str]]]:
    """The judged pairs with the models that wrote A and B (unjudged pairs stay hidden)."""
    names = [m["model"] for m in record["models"]]
    out = []
    for pair in record["pairs"]:
        winner = record["verdicts"].get(pair["pair_id"])
        if winner is not None:
            a, b = names[pair["a"]], names[pair["b"]]
            out.append({"pair_id": pair["pair_id"], "A": a, "B": b, "winner": winner,
                        "winner_model": None if winner == "tie" else a if winner == "A" else b})
    return out
