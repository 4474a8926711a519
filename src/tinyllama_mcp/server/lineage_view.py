"""One model's lineage read from the store and the job folders: models://{ref}, and its compact form for status and
/v1/models.

Sources: each job's spec and parents (store), JOB_DIR/lineage.json (pipeline/lineage.py), evaluate jobs
(JOB_DIR/evaluation/metrics.json) and export jobs (JOB_DIR/export/manifest.json) whose parents name the model,
and the alias history. Files that are missing or unreadable leave their fields empty: lineage never fails a view.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.alias_store import AliasMove
from tinyllama_mcp.server.lineage_models import (
    AliasMoveView, DatasetRecord, EvaluationRecord, ExportFile, ExportRecord, LineageStep, LineageSummary,
    ModelLineage,
)
from tinyllama_mcp.server.references import JOB_ID, SERVABLE_STAGES, alias_model, job_by_ref, job_model
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import Job

ALL_JOBS = 1_000_000  # the store has no "every job" query; recent() with a limit no store reaches
MAX_DEPTH = 64  # a chain longer than this is cut (a corrupt store must not loop)
_NOT_HYPERPARAMETERS = {"stage", "base_model", "parents", "dataset", "sft_adapter", "dpo_adapter", "model"}


def iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def job_of_folder(svc: Services, base: str) -> Optional[Job]:
    """The job whose merged/ folder `base` is (a base model that is an earlier merge), if any."""
    folder = Path(base)
    if folder.name != "merged" or not JOB_ID.match(folder.parent.name):
        return None
    if folder.parent.parent.resolve() != svc.settings.jobs_dir.resolve():
        return None
    return svc.store.get(folder.parent.name)


class JobIndex:
    """Jobs read once per view: by id on demand, every job only when evaluations or exports are asked for."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._by_id: dict[str, Optional[Job]] = {}
        self._children: Optional[dict[str, list[Job]]] = None  # evaluate/export jobs by the id they name

    def get(self, job_id: str) -> Optional[Job]:
        if job_id not in self._by_id:
            self._by_id[job_id] = self.svc.store.get(job_id)
        return self._by_id[job_id]

    def chain(self, job: Job) -> list[Job]:
        """The job's ancestors, parents before children, ending with the job itself."""
        seen: dict[str, Job] = {}

        def walk(current: Job, depth: int) -> None:
            if current.id in seen or depth > MAX_DEPTH:
                return
            before = [p for p in (self.get(pid) for pid in current.parents) if p is not None]
            if not current.parents:
                earlier = job_of_folder(self.svc, str(current.spec.get("base_model", "")))
                before = [earlier] if earlier is not None else []
            for parent in before:
                walk(parent, depth + 1)
            seen[current.id] = current

        walk(job, 0)
        return list(seen.values())

    def _load_children(self) -> dict[str, list[Job]]:
        if self._children is None:
            self._children = {}
            for job in self.svc.store.recent(ALL_JOBS):  # newest first
                self._by_id.setdefault(job.id, job)
                if job.stage in ("evaluate", "export"):
                    names = job.parents or [job.spec.get("model_label"), job.spec.get("model")]
                    for name in dict.fromkeys(n for n in names if n):
                        self._children.setdefault(name, []).append(job)
        return self._children

    def children(self, target: str, stage: str) -> list[Job]:
        """Evaluate or export jobs of `target` (a job id, or a base model by name), newest first."""
        return [job for job in self._load_children().get(target, []) if job.stage == stage]


# --------------------------------------------------------------------------- pieces
def _datasets(job: Job, record: Optional[dict[str, Any]]) -> list[DatasetRecord]:
    found = (record or {}).get("datasets")
    if not isinstance(found, list) or not found:
        spec_dataset = job.spec.get("dataset")
        found = [spec_dataset] if isinstance(spec_dataset, dict) else []
    out = []
    for entry in found:
        if isinstance(entry, dict):
            rows = entry.get("rows")
            out.append(DatasetRecord(job_id=job.id, stage=job.stage, source=entry.get("source"),
                                     sha256=entry.get("sha256"), rows=rows if isinstance(rows, int) else None,
                                     layout=entry.get("layout") if isinstance(entry.get("layout"), str) else None))
    return out


def _step(job: Job) -> LineageStep:
    path = job.job_dir / "lineage.json"
    record = _read_json(path)
    libraries = (record or {}).get("libraries")
    effective = (record or {}).get("effective")
    return LineageStep(
        job_id=job.id, stage=job.stage, state=job.state, output_name=job.name,
        base_model=job.spec.get("base_model"), base_model_resolved=(record or {}).get("base_model_resolved"),
        parents=job.parents, datasets=_datasets(job, record),
        hyperparameters={k: v for k, v in job.spec.items() if k not in _NOT_HYPERPARAMETERS},
        effective=effective if isinstance(effective, dict) else None,
        libraries={str(k): str(v) for k, v in libraries.items()} if isinstance(libraries, dict) else None,
        created_at=iso(job.created_at), finished_at=iso(job.finished_at),
        lineage_file=str(path) if record is not None else None,
    )


def _evaluation(job: Job) -> EvaluationRecord:
    data = _read_json(job.job_dir / "evaluation" / "metrics.json") if job.state == "succeeded" else None
    metrics = (data or {}).get("metrics")
    datasets = (data or {}).get("datasets")
    return EvaluationRecord(
        job_id=job.id, state=job.state, finished_at=iso(job.finished_at),
        model=(data or {}).get("model") or job.spec.get("model_label"),
        metrics=metrics if isinstance(metrics, dict) else None, datasets=datasets if isinstance(datasets, list) else [],
    )


def _export(job: Job) -> ExportRecord:
    folder = job.job_dir / "export"
    data = _read_json(folder / "manifest.json") if job.state == "succeeded" else None
    files = []
    for entry in (data or {}).get("files") or []:
        if isinstance(entry, dict):  # manifest paths are relative to export/
            path = entry.get("path")
            files.append(ExportFile.model_validate({
                "format": entry.get("format"), "path": str(folder / str(path)) if path else None,
                "bytes": entry.get("bytes"), "sha256": entry.get("sha256"),
                "verification": entry.get("verification") or {}}))
    return ExportRecord(job_id=job.id, state=job.state, finished_at=iso(job.finished_at), files=files)


def move_view(move: AliasMove) -> AliasMoveView:
    return AliasMoveView(alias=move.name, target=move.target, previous=move.previous, action=move.action,
                         at=iso(move.at) or "", reason=move.reason, by=move.by)


def summary(index: JobIndex, job: Optional[Job], base: str = TINY_DEMO) -> LineageSummary:
    """The compact lineage of a job, or of a base model (job None) by its name."""
    if job is None:
        return LineageSummary(root=base, chain=[])
    chain = index.chain(job)
    root = str(chain[0].spec.get("base_model", "")) if chain else base
    datasets = [d for step in chain if step.stage in ("sft", "dpo") for d in _datasets(step, None)]
    return LineageSummary(root=root, chain=[step.id for step in chain], datasets=datasets)


def newest_evaluation(index: JobIndex, target: str) -> Optional[EvaluationRecord]:
    """The newest succeeded evaluation of `target` that left metrics."""
    for job in index.children(target, "evaluate"):
        if job.state == "succeeded":
            record = _evaluation(job)
            if record.metrics is not None:
                return record
    return None


# --------------------------------------------------------------------------- the views
def resolve_target(svc: Services, ref: str) -> tuple[str, Optional[Job]]:
    """(target, its job or None) of a model reference: an alias, a job id or output_name, or a base model."""
    alias = svc.aliases.get(ref)
    target = alias.target if alias is not None else ref
    if target == TINY_DEMO or (svc.settings.hf_local_model_path and target == svc.settings.hf_local_model_path):
        return target, None
    if alias is not None and JOB_ID.match(target) and svc.store.get(target) is None:
        raise UserError(f"alias {ref!r} points at job {target}, which no longer exists; promote another model to it")
    job = job_by_ref(svc, target)
    if job is None:
        raise UserError(f"{ref!r} is no model of this server: give a job id, an output_name, an alias or 'tiny-demo' "
                        "(read models:// for the list)")
    if job.stage not in SERVABLE_STAGES:
        named = f"models://{job.parents[0]}" if job.parents else "models://"
        raise UserError(f"{ref!r} is an {job.stage} job, not a model; read {named} for the model it names")
    return job.id, job


def model_lineage(svc: Services, ref: str) -> ModelLineage:
    """models://{ref}: dataset sha256 -> SFT -> DPO -> merge -> evaluations -> export files -> alias history."""
    target, job = resolve_target(svc, ref)
    index = JobIndex(svc)
    return ModelLineage(
        model=ref, target=target, aliases=svc.aliases.pointing_at(target), summary=summary(index, job, target),
        steps=[_step(step) for step in index.chain(job)] if job is not None else [],
        evaluations=[_evaluation(e) for e in index.children(target, "evaluate")],
        exports=[_export(e) for e in index.children(target, "export")],
        alias_history=[move_view(m) for m in svc.aliases.moves_touching(target)],
    )


def model_facts(svc: Services, index: JobIndex, target: str, job: Optional[Job]) -> dict[str, Any]:
    """What /v1/models and models:// add to a model's entry: its aliases, newest metrics, lineage summary."""
    evaluation = newest_evaluation(index, target)
    return {
        "aliases": svc.aliases.pointing_at(target),
        "metrics": evaluation.metrics if evaluation is not None else None,
        "evaluation_job": evaluation.job_id if evaluation is not None else None,
        "lineage": summary(index, job, target).model_dump(mode="json"),
    }


def models_overview(svc: Services) -> dict[str, Any]:
    """models://: every servable model once (base models, then jobs oldest first) and every alias with its state."""
    index = JobIndex(svc)
    bases = [TINY_DEMO] + ([svc.settings.hf_local_model_path] if svc.settings.hf_local_model_path else [])
    models = [{"model": base, "output_name": None, "stage": None, **model_facts(svc, index, base, None)}
              for base in bases]
    for job in reversed(svc.store.recent(ALL_JOBS)):
        if job.state != "succeeded" or job.stage not in SERVABLE_STAGES:
            continue
        try:
            job_model(svc, job)
        except UserError:  # its artifacts were removed: not servable, not listed
            continue
        models.append({"model": job.id, "output_name": job.name, "stage": job.stage,
                       "finished_at": iso(job.finished_at), **model_facts(svc, index, job.id, job)})
    aliases = []
    for alias in svc.aliases.all():
        try:
            alias_model(svc, alias.name, alias.target)
            problem = None
        except UserError as exc:
            problem = str(exc)
        aliases.append({"alias": alias.name, "target": alias.target, "updated_at": iso(alias.updated_at),
                        "servable": problem is None, "problem": problem})
    return {"models": models, "aliases": aliases}
