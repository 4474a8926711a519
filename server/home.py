"""Where the server home is, with the standard library only (the stdio front reads it before pydantic loads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_VARIABLE = "TINYLLAMA_MCP_HOME"


def default_home() -> Path:
    """The per-user data folder (what platformdirs calls user_data_dir), without the dependency."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tinyllama-mcp"


def expand_home(value: os.PathLike | str) -> Path:
    return Path(os.path.expanduser(value)).absolute()


def home_from_environment() -> Path:
    """The home Settings will use (its HOME_VARIABLE, else the default), as Settings expands it."""
    return expand_home(os.environ.get(HOME_VARIABLE) or default_home())
