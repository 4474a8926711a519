"""Which checkpoint to resume from.

The Trainer writes a checkpoint folder file by file, so a process killed mid-save leaves a
partial folder that looks like the newest. After a save completes we write a manifest
(`COMPLETE.json`: every file's size and sha256) atomically; a checkpoint counts only if its
manifest is there and every file still matches it. Broken ones are set aside, not deleted,
so nothing a person might want is lost.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline.data import sha256_file

MANIFEST = "COMPLETE.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_complete(checkpoints_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint; newer broken ones are renamed `broken-checkpoint-N`."""
    if not checkpoints_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in checkpoints_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))
    )
    for _, folder in reversed(found):
        if is_complete(folder):
            return folder
        _set_aside(folder)
    return None


def _set_aside(folder: Path) -> None:
    """Rename a broken checkpoint to `broken-checkpoint-N` (`-2`, `-3`, ... when the same step broke before:
    renaming a folder onto an existing non-empty one fails, and the job would fail on every retry)."""
    target = folder.with_name(f"broken-{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"broken-{folder.name}-{n}")
    os.replace(folder, target)
