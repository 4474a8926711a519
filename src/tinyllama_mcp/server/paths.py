"""Which files a caller may name: local paths must stay inside the allowed roots.

A tool argument is either a local path or a hub name. Local paths are resolved (symlinks followed)
and must lie inside one of the roots both before and after resolution, so neither `..` nor a
symlink pointing out of a root reaches other files. Hub names are checked against the hub's own
naming rules, so a name can never be mistaken for a path.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.sources import looks_local

ROOTS_HINT = "add its folder to TINYLLAMA_MCP_DATA_ROOTS (os.pathsep-separated) or copy it into the server home's data/ folder"


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_local(text: str, roots: list[Path], what: str) -> Path:
    """Resolve a caller-supplied local path, refusing anything outside `roots`."""
    if "\x00" in text:
        raise UserError(f"{what} {text!r} contains a NUL character; pass a plain file path")
    raw = Path(os.path.expanduser(text))
    if ".." in raw.parts:
        raise UserError(f"{what} {text!r} contains '..'; pass the path without parent-folder steps")
    absolute = raw if raw.is_absolute() else Path.cwd() / raw
    lexical = Path(os.path.normpath(absolute))
    resolved = absolute.resolve()
    if not (_inside(lexical, roots) and _inside(resolved, roots)):
        where = ", ".join(str(root) for root in roots)
        detail = " (it is a symlink that points outside them)" if _inside(lexical, roots) else ""
        raise UserError(f"{what} {text!r} is outside the allowed folders ({where}){detail}; {ROOTS_HINT}")
    return resolved


def dataset_source(text: str, roots: list[Path]) -> str:
    """A dataset argument as the pipeline's DatasetSpec.source: an absolute path inside the roots, or a hub name."""
    if looks_local(text):
        path = resolve_local(text, roots, "dataset")
        if not path.is_file():
            raise UserError(
                f"dataset {text!r} does not exist or is not a file ({path}); pass a .jsonl, .json or .parquet file"
            )
        return str(path)
    return text
