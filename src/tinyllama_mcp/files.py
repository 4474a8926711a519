"""Metadata files written whole or not at all: the one way the project writes spec.json, stack.json, lineage.json,
checkpoint manifests, eval samples and the handshake cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers (other processes included) see the old content or the new, never a
    torn or empty file, even after a crash: a temporary sibling is written, synced to disk, then renamed."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
