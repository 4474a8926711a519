"""Where a model or dataset reference points, one rule each for the server and the pipeline: a local path or a
hub name, and whether the hub may be reached at all."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping, Optional

# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.'; no '..').
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text


def looks_local(text: str) -> bool:
    """A local path rather than a hub name: anything path-like, with a data suffix, not a hub id, or existing here."""
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return True
    if text.lower().endswith(DATA_SUFFIXES):
        return True
    if not is_hub_id(text):
        return True
    return Path(text).expanduser().exists()


def offline(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether Hugging Face's offline mode is set (HF_HUB_OFFLINE): then nothing is fetched from the hub."""
    return (os.environ if env is None else env).get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be reached (fails fast without network)."""
    if offline():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
