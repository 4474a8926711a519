"""lineage.json: trace an artifact back to its base model, data, hyperparameters, parents and libraries."""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

from tinyllama_mcp.files import write_atomic

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_lineage(job_dir: Path, spec, resolved_base: str, datasets: list[dict], effective: dict[str, Any],
                  validation: Optional[dict] = None) -> Path:
    """`validation`: the held-out rows' origin, figures at each checkpoint and at the end, the best checkpoint."""
    record = {
        "job_dir": str(job_dir.resolve()),
        "stage": spec.stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": spec.base_model,
        "base_model_resolved": resolved_base,
        "datasets": datasets,
        "spec": spec.model_dump(mode="json"),
        "effective": effective,
        "parents": spec.parents,
        "libraries": library_versions(),
    }
    if validation is not None:
        record["validation"] = validation
    path = job_dir / "lineage.json"
    write_atomic(path, json.dumps(record, indent=2))
    return path
