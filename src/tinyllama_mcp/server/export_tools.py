"""The export tool: queue a job that writes one servable model in the asked formats, each verified before success."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import ExportSpec, export_formats
from tinyllama_mcp.server.errors import describe_validation_error
from tinyllama_mcp.server.export_models import ExportInput
from tinyllama_mcp.server.models import StartJobOutput
from tinyllama_mcp.server.references import resolve_generate_model
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.tools import enqueue_job

NEXT = ("Call status(job_id='{job_id}') every 10-30 s until state is 'succeeded'; status then lists each file with its "
        "sha256 and check figures. Load them as README's 'Exports' says (llama-cli -m, ollama create -f Modelfile, "
        "vllm serve --enable-lora).")


def _job_of(svc: Services, folder: str) -> Optional[str]:
    """The id of the job whose folder holds `folder`, or None for a model outside the job store."""
    try:
        relative = Path(folder).resolve().relative_to(svc.settings.jobs_dir.resolve())
    except ValueError:
        return None
    job = svc.store.get(relative.parts[0]) if relative.parts else None
    return job.id if job is not None else None


def export(svc: Services, args: ExportInput) -> StartJobOutput:
    model_ref, label = resolve_generate_model(svc, args.model)
    parent = _job_of(svc, model_ref)
    is_adapter = Path(model_ref, "adapter_config.json").is_file()
    formats = export_formats(args.formats, is_adapter, label)  # an adapter format of a whole model fails here, at once
    base_model = model_ref
    if parent is not None:
        base_model = svc.store.get(parent).spec.get("base_model") or model_ref
    try:
        spec = ExportSpec(base_model=base_model, model=model_ref, model_label=label, formats=formats,
                          file_stem=args.output_name or "model", parents=[parent] if parent else [])
    except ValidationError as exc:
        raise UserError(f"invalid export settings: {describe_validation_error(exc)}") from None
    return enqueue_job(svc, spec, args.output_name, None, NEXT)
