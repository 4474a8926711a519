"""The export stage: load the model as generate serves it, write each asked format, verify each, then publish.

Files are written into JOB_DIR/.export.tmp and renamed to JOB_DIR/export only once every one passed its check and
manifest.json lists them; a failed check fails the job (SelfCheckError) and leaves no export/ folder behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.export.manifest import entry, summary_files, write_manifest
from tinyllama_mcp.pipeline.export.verify import check, relative_path, write
from tinyllama_mcp.pipeline.generate import resolve_ref
from tinyllama_mcp.pipeline.lineage import library_versions, write_lineage
from tinyllama_mcp.pipeline.specs import ExportSpec, export_formats


def run_export(spec: ExportSpec, job_dir: Path, log: EventLog) -> dict:
    from importlib.metadata import version

    from tinyllama_mcp.pipeline.export.source import load_source

    kind, _ = resolve_ref(spec.model)
    formats = export_formats(spec.formats, kind == "adapter", spec.model_label)
    log.emit("start", stage="export", device="cpu", resume_step=None, total_steps=len(formats), rows=None)
    source = load_source(spec.model)
    tmp, final = job_dir / ".export.tmp", job_dir / "export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[dict] = []
    for step, fmt in enumerate(formats, 1):
        started = time.perf_counter()
        relative = relative_path(fmt, spec.file_stem)
        extra = write(fmt, tmp, relative, source, spec.model_label, files)
        verification = check(fmt, tmp / relative, source, files)
        files.append(entry(tmp, relative, fmt, verification, extra))
        log.emit("step", step=step, total=len(formats), format=fmt, path=relative,
                 max_abs_logit_diff=verification.get("max_abs_logit_diff"), bound=verification.get("bound"),
                 seconds=round(time.perf_counter() - started, 2))
    manifest = {
        "model": spec.model_label, "source": spec.model, "source_resolved": source.path, "kind": source.kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prompts": source.texts,
        "files": files, "libraries": {**library_versions(), "gguf": version("gguf")},
    }
    write_manifest(tmp, manifest)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.emit("artifact", kind="export", path=str(final))
    lineage = write_lineage(job_dir, spec, source.path, [], {"formats": formats, "kind": source.kind})
    log.emit("artifact", kind="lineage", path=str(lineage))
    return {"export": str(final), "model": spec.model_label, "kind": source.kind, "formats": formats,
            "files": summary_files(manifest)}
