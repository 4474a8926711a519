"""The export tool's input model, and what status shows of a finished export (read from its manifest.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from tinyllama_mcp.pipeline.specs import ExportFormat
from tinyllama_mcp.server.models import NAME_PATTERN, ToolInput


class ExportInput(ToolInput):
    model: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="What to export: a merge job's id or output_name (a whole model), a finished SFT/DPO job (its "
        "adapter on its base), 'tiny-demo', or a local model folder. Default: as generate's default model.",
    )
    formats: Optional[list[ExportFormat]] = Field(
        None, min_length=1, max_length=7,
        description="Any of: 'gguf-f16', 'gguf-bf16', 'gguf-q8_0' (llama.cpp/Ollama models), 'gguf-lora' (llama.cpp "
        "LoRA adapter), 'ollama' (a Modelfile FROM the GGUF), 'peft' (adapter for vLLM --lora-modules), "
        "'safetensors' (merged transformers checkpoint). gguf-lora and peft need an SFT/DPO job. Default: gguf-f16, "
        "gguf-q8_0, ollama, safetensors, plus gguf-lora and peft for an adapter.",
    )
    output_name: Optional[str] = Field(
        None, pattern=NAME_PATTERN,
        description="A unique name for this export job; also the stem of the file names (default 'model').",
    )


def export_summary(job_dir: Path, summary: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The job summary with every exported file's path, bytes, sha256 and verification figures from manifest.json."""
    try:
        manifest = json.loads((job_dir / "export" / "manifest.json").read_text("utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return summary
    rows = [{"format": f.get("format"), "path": str(job_dir / "export" / str(f.get("path"))), "bytes": f.get("bytes"),
             "sha256": f.get("sha256"), "verification": f.get("verification")} for f in files if isinstance(f, dict)]
    return {**(summary or {}), "export": str(job_dir / "export"), "files": rows}
