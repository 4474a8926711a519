"""export/manifest.json: every exported file with its size, sha256 and verification figures (the contract readers use).

{"model": label, "source": model reference, "kind": "model"|"adapter", "files": [{"format", "path" (relative),
"bytes", "sha256", "verification": {"method", "max_abs_logit_diff", "bound", "passed", ...}}], ...}. A folder format
(peft, safetensors) lists its files under "parts"; its sha256 is that of the lines "<sha256>  <name>" of its parts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from tinyllama_mcp.errors import SelfCheckError
from tinyllama_mcp.files import write_atomic

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(root: Path, relative: str) -> dict:
    """path, bytes and sha256 of a file or folder under root (a folder's parts too)."""
    path = root / relative
    if path.is_file():
        return {"path": relative, "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    parts = [describe(root, str(p.relative_to(root))) for p in sorted(path.rglob("*")) if p.is_file()]
    listing = "".join(f"{p['sha256']}  {Path(p['path']).relative_to(relative)}\n" for p in parts)
    return {"path": relative, "bytes": sum(p["bytes"] for p in parts),
            "sha256": hashlib.sha256(listing.encode()).hexdigest(), "parts": parts}


def entry(root: Path, relative: str, fmt: str, verification: dict, extra: Optional[dict] = None) -> dict:
    return {"format": fmt, **describe(root, relative), **(extra or {}), "verification": verification}


def unchanged(root: Path, recorded: dict) -> None:
    """SelfCheckError when a file's size or sha256 is no longer what the manifest recorded."""
    now = describe(root, recorded["path"])
    if now["bytes"] != recorded["bytes"]:
        raise SelfCheckError(f"{recorded['path']} has {now['bytes']} bytes but the manifest recorded "
                             f"{recorded['bytes']}: it was truncated or changed after export; export again")
    if now["sha256"] != recorded["sha256"]:
        raise SelfCheckError(f"{recorded['path']} has sha256 {now['sha256'][:16]}... but the manifest recorded "
                             f"{recorded['sha256'][:16]}...: it changed after export; export again")


def write_manifest(root: Path, manifest: dict) -> Path:
    path = root / MANIFEST
    write_atomic(path, json.dumps(manifest, indent=2))
    return path


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SelfCheckError(f"{path} cannot be read ({exc}); pass the export/ folder of a finished export "
                             "job") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise SelfCheckError(f"{path} has no 'files' list; it is not an export manifest")
    return manifest


def summary_files(manifest: dict) -> list[dict]:
    """The files as the job summary shows them: format, path, size, sha256 and the logit figure with its bound."""
    rows = []
    for f in manifest["files"]:
        v = f.get("verification") or {}
        rows.append({"format": f["format"], "path": f["path"], "bytes": f["bytes"], "sha256": f["sha256"],
                     "max_abs_logit_diff": v.get("max_abs_logit_diff"), "bound": v.get("bound"),
                     "passed": v.get("passed")})
    return rows
