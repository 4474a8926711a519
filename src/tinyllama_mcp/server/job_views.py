"""A job as the status tool and the jobs:// resource show it: progress, metrics, artifacts, workers, the next step."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.evaluation.results import read_metrics
from tinyllama_mcp.server import lineage_view
from tinyllama_mcp.server.events import log_tail
from tinyllama_mcp.server.export_models import export_summary
from tinyllama_mcp.server.models import JobView, Metrics, Progress, WorkerView
from tinyllama_mcp.server.references import JOB_ID
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import Job


VALIDATION_FIGURES = tuple(name for name in Metrics.model_fields if name.startswith(("valid_", "full_valid_")))


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def job_view(svc: Services, job: Job, log_lines: int) -> JobView:
    p = job.progress
    step = p.get("step") or {}
    start = p.get("start") or {}
    total = step.get("total") or start.get("total_steps")
    progress = None
    if step or total:
        current = step.get("step", start.get("resume_step") or 0)
        percent = round(100.0 * current / total, 1) if total else None
        if job.state == "succeeded" and total:
            percent = 100.0
        progress = Progress(step=current, total=total, percent=percent, epoch=step.get("epoch"))
    metric_names = ("loss", "learning_rate", "grad_norm", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")
    values = {name: step[name] for name in metric_names if isinstance(step.get(name), (int, float))}
    validation = p.get("validation") or {}
    values.update({name: validation[name] for name in VALIDATION_FIGURES
                   if isinstance(validation.get(name), (int, float))})
    eval_loss = (p.get("eval") or {}).get("eval_loss")  # jobs run before validation had its own figures
    metrics = Metrics(**values, eval_loss=eval_loss) if values or eval_loss is not None else None
    artifacts = dict(p.get("artifacts") or {})
    if job.state == "succeeded":
        for kind in ("adapter", "merged"):
            if kind not in artifacts and (job.job_dir / kind).is_dir():
                artifacts[kind] = str(job.job_dir / kind)
    summary = p.get("summary")
    if job.stage == "export" and job.state == "succeeded":  # every file with its sha256 and check figures
        summary = export_summary(job.job_dir, summary)
        artifacts.setdefault("export", str(job.job_dir / "export"))
    evaluation = None
    if job.stage == "evaluate" and job.state == "succeeded":  # the metrics of evaluation/metrics.json
        evaluation = (read_metrics(job.job_dir) or {}).get("metrics")
    error = job.error
    if job.state in ("running", "queued") and p.get("error"):
        error = error or p.get("error")
    return JobView(
        job_id=job.id, stage=job.stage, state=job.state, output_name=job.name,
        base_model=job.spec.get("base_model"), parents=job.parents,
        created_at=_iso(job.created_at), started_at=_iso(job.started_at), finished_at=_iso(job.finished_at),
        attempts=job.attempts, max_attempts=job.max_attempts,
        queue_position=svc.store.queue_position(job.id) if job.state == "queued" else None,
        progress=progress, metrics=metrics,
        tokens_per_s=step.get("tokens_per_s"), eta_s=step.get("eta_s") if job.state == "running" else None,
        summary=summary, artifacts=artifacts, error=error, attempt_errors=job.attempt_errors,
        warnings=list(p.get("warnings") or []), cancel_requested=job.cancel_requested, job_dir=str(job.job_dir),
        log_tail=log_tail(job.job_dir / "log.txt", log_lines),
        best_checkpoint=validation.get("best_checkpoint"), evaluation=evaluation,
        aliases=svc.aliases.pointing_at(job.id), lineage=lineage_view.summary(lineage_view.JobIndex(svc), job),
    )


def workers(svc: Services) -> list[WorkerView]:
    now = time.time()
    views = []
    for lease in svc.store.leases():
        gpu = svc.devices[lease.slot] if lease.slot < len(svc.devices) else None
        views.append(WorkerView(
            slot=lease.slot, device=f"GPU {gpu}" if gpu is not None else "CPU", worker_pid=lease.pid, host=lease.host,
            alive=lease.expires_at > now, job_id=lease.job_id,
        ))
    return [view for view in views if view.alive] or views


def hint(job: Job, workers: list[WorkerView]) -> str:
    if job.state == "queued" and not any(w.alive for w in workers):
        return "No worker is alive: the job waits until a server with TINYLLAMA_MCP_WORKER=1 or `tinyllama-mcp worker` runs."
    if job.state == "queued" and job.parents:
        return "The job starts once its parent jobs have succeeded."
    if job.state == "running":
        return f"Training is under way; wait(job_id='{job.id}') returns when it ends."
    if job.state == "succeeded" and job.stage == "sft":
        return f"Next: start_dpo(sft_job_id='{job.id}', dataset=...) or merge(sft_job_id='{job.id}')."
    if job.state == "succeeded" and job.stage == "dpo":
        return f"Next: merge(dpo_job_id='{job.id}')."
    if job.state == "succeeded" and job.stage == "merge":
        return f"Next: generate(model='{job.name or job.id}', prompt=...)."
    if job.state == "succeeded" and job.stage == "evaluate":
        return ("Its metrics are under evaluation. Next: compare(models=[...]) to rank models on the same inputs, "
                "with blinded answer pairs to judge.")
    if job.state == "succeeded" and job.stage == "export":
        return "Next: load the files listed in summary.files (README 'Exports': llama-cli -m, ollama create, vllm)."
    if job.state == "failed":
        return "Read error and log_tail; fix the cause and start the stage again."
    return ""


def job_json(svc: Services, job_id: str) -> str:
    """The jobs://{job_id} resource: the job's status as JSON."""
    if not JOB_ID.match(job_id):
        raise UserError(f"{job_id!r} is not a job id (like 'sft-3f9a0c12ab4e')")
    job = svc.store.get(job_id)
    if job is None:
        raise UserError(f"no job {job_id!r}")
    return json.dumps(job_view(svc, job, 20).model_dump(mode="json"), indent=2)
