"""Reading a job's events.jsonl and folding it into the small progress record the store keeps.

The pipeline appends one JSON object a line (docs/PIPELINE_CLI.md). The worker tails the file and
keeps only what `status` shows: the start event, the latest step, eval results, the newest validation
figures, the newest checkpoint, warnings, artifacts, the end summary and the error message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_WARNINGS = 20


def read_new_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte `offset`, and the offset to continue from.

    A line still being written (no trailing newline yet) is left for the next call.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn or foreign line must not stop the job's bookkeeping
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events, offset + end + 1


def fold(progress: dict[str, Any], event: dict[str, Any]) -> None:
    """Fold one event into `progress` (in place)."""
    kind = event["event"]
    body = {key: value for key, value in event.items() if key != "event"}
    if kind == "start":
        # A new attempt begins: what the previous one ended with no longer applies.
        progress.pop("error", None)
        progress.pop("summary", None)
        progress["start"] = body
    elif kind == "step":
        progress["step"] = body
    elif kind == "eval":
        progress.setdefault("eval", {}).update(body)
    elif kind == "validation":  # a checkpoint's valid_* figures, the end's full_valid_*, the best checkpoint so far
        progress.setdefault("validation", {}).update(body)
    elif kind == "checkpoint":
        progress["checkpoint"] = body
    elif kind == "warning":
        warnings = progress.setdefault("warnings", [])
        if len(warnings) < MAX_WARNINGS:
            warnings.append(str(body.get("message", "")))
    elif kind == "artifact":
        if isinstance(body.get("kind"), str) and isinstance(body.get("path"), str):
            progress.setdefault("artifacts", {})[body["kind"]] = body["path"]
    elif kind == "end":
        progress["summary"] = body.get("summary") or {}
    elif kind == "error":
        progress["error"] = str(body.get("message", ""))


def log_tail(path: Path, lines: int, max_bytes: int = 64_000, max_line: int = 500) -> list[str]:
    """The last `lines` lines of a log file, each cut to `max_line` characters."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    # Progress bars redraw with carriage returns; keep only the last state of each line.
    rows = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in text.split("\n")]
    rows = [row for row in rows if row.strip()]
    return [row[:max_line] for row in rows[-lines:]]
