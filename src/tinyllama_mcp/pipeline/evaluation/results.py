"""Where an evaluate job leaves its results, and reading them back (torch-free: the server reads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

OUTPUT = "evaluation"  # JOB_DIR/evaluation/, the folder a succeeded evaluate job must leave
METRICS = "metrics.json"
GENERATIONS = "generations.jsonl"


def read_metrics(job_dir: Path) -> Optional[dict[str, Any]]:
    """metrics.json of a finished evaluate job; None when it is absent or unreadable (removed, still running)."""
    try:
        record = json.loads((job_dir / OUTPUT / METRICS).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_generations(job_dir: Path) -> list[dict[str, Any]]:
    """generations.jsonl's lines in prompt order (empty when the evaluation had no prompts)."""
    try:
        text = (job_dir / OUTPUT / GENERATIONS).read_text("utf-8")
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
