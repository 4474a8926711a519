"""What a tool argument names: a job (by id or output_name), a base model to train on, a model to generate with.
Mistakes a caller can fix raise UserError with what to pass instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.paths import resolve_local
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import JOB_ID_PATTERN, Job
from tinyllama_mcp.sources import is_hub_id, looks_local, offline

JOB_ID = re.compile(JOB_ID_PATTERN)


def job_by_ref(svc: Services, ref: str) -> Optional[Job]:
    """A job named by its id or its output_name; None when `ref` names no job."""
    if JOB_ID.match(ref):
        job = svc.store.get(ref)
        if job is None:
            raise UserError(f"no job {ref!r}; call status without job_id to list jobs")
        return job
    return svc.store.find_by_name(ref)


def require_job(svc: Services, job_id: str, stage: str, *, allow_unfinished: bool) -> Job:
    job = svc.store.get(job_id)
    if job is None:
        raise UserError(f"no job {job_id!r}; call status without job_id to list jobs")
    if job.stage != stage:
        raise UserError(f"job {job_id} is a {job.stage} job, not a {stage} job")
    if job.state in ("failed", "cancelled"):
        raise UserError(f"job {job_id} {job.state}; start that stage again and use the new job's id")
    if not allow_unfinished and job.state != "succeeded":
        raise UserError(f"job {job_id} is still {job.state}; wait until status shows 'succeeded'")
    return job


def _local_model(svc: Services, ref: str) -> str:
    path = resolve_local(ref, svc.settings.model_root_paths(), "model")
    if not path.is_dir():
        raise UserError(f"model {ref!r} is not a folder ({path}); pass a checkpoint folder, a hub id or a job id")
    return str(path)


def _offline(svc: Services) -> bool:
    return svc.settings.offline if svc.settings.offline is not None else offline()


def _hub_model_available(svc: Services, name: str) -> str:
    """A hub model id, refused at once when offline and not in the local cache (the job could only fail)."""
    if not _offline(svc):
        return name
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library itself rejects
        cached = False
    if not cached:
        raise UserError(
            f"model {name!r} is not in the local Hugging Face cache and this server is offline (HF_HUB_OFFLINE); "
            "pass a local checkpoint folder, a merge job id or 'tiny-demo'"
        )
    return name


def resolve_base_model(svc: Services, ref: Optional[str]) -> str:
    """A training base model: 'tiny-demo', a hub id, a local checkpoint folder, or a finished merge job."""
    if ref is None:
        return svc.settings.base_model  # the operator's own setting: trusted as is
    if ref == TINY_DEMO:
        return ref
    job = job_by_ref(svc, ref)
    if job is not None:
        if job.stage != "merge":
            raise UserError(
                f"{ref!r} is a {job.stage} job; train on top of it with start_dpo(sft_job_id=...) or merge it first"
            )
        require_job(svc, job.id, "merge", allow_unfinished=False)
        return str(job.job_dir / "merged")
    if looks_local(ref):
        return _local_model(svc, ref)
    if is_hub_id(ref):
        return _hub_model_available(svc, ref)
    raise UserError(f"base_model {ref!r} is neither 'tiny-demo', a hub id, a local folder nor a merge job")


def resolve_generate_model(svc: Services, ref: Optional[str]) -> tuple[str, str]:
    """(what pipeline.generate.load_generator gets, how the answer names it)."""
    if ref is None:
        if svc.settings.hf_local_model_path:
            return svc.settings.hf_local_model_path, svc.settings.hf_local_model_path
        newest = svc.store.newest_succeeded("merge")
        if newest is not None:
            return str(newest.job_dir / "merged"), f"{newest.id} (newest merged model)"
        return TINY_DEMO, TINY_DEMO
    if ref == TINY_DEMO:
        return ref, ref
    alias = svc.aliases.get(ref)
    if alias is not None:
        folder, label = alias_model(svc, alias.name, alias.target)
        return folder, f"{label}, alias {alias.name}"
    job = job_by_ref(svc, ref)
    if job is not None:
        return job_model(svc, job)
    if looks_local(ref):
        path = _local_model(svc, ref)
        return path, path
    if is_hub_id(ref):
        return ref, ref
    raise UserError(f"model {ref!r} is neither a job id, an output_name, 'tiny-demo', a hub id nor a local folder")


SERVABLE_STAGES = ("sft", "dpo", "merge")


def job_model(svc: Services, job: Job) -> tuple[str, str]:
    """(folder generate loads, label) of a succeeded SFT/DPO/merge job whose artifacts are still there."""
    if job.stage not in SERVABLE_STAGES:
        raise UserError(f"job {job.id} is an {job.stage} job, which serves no model; name the sft, dpo or merge job")
    require_job(svc, job.id, job.stage, allow_unfinished=False)
    folder = job.job_dir / ("merged" if job.stage == "merge" else "adapter")
    if not folder.is_dir():
        raise UserError(f"job {job.id} has no {folder.name}/ folder; its artifacts were removed")
    return str(folder), job.id if job.name is None else f"{job.id} ({job.name})"


def target_model(svc: Services, target: str) -> tuple[str, str]:
    """(what generate loads, label) of what an alias keeps: a job id, 'tiny-demo' or a local model folder."""
    if target == TINY_DEMO or target == svc.settings.hf_local_model_path:
        return target, target
    if not JOB_ID.match(target):  # HF_LOCAL_MODEL_PATH's model when it was promoted, since changed
        if not Path(target).is_dir():
            raise UserError(f"{target} is no longer a model folder")
        return target, target
    job = svc.store.get(target)
    if job is None:
        raise UserError(f"job {target} no longer exists")
    return job_model(svc, job)


def alias_model(svc: Services, name: str, target: str) -> tuple[str, str]:
    """target_model of an alias, its errors saying which alias and what to do."""
    try:
        return target_model(svc, target)
    except UserError as exc:
        raise UserError(f"alias {name!r} points at {target}, but {exc}; promote a servable model to {name!r} "
                        f"or rollback(alias={name!r})") from None


def resolved_or_none(svc: Services, ref: str) -> Optional[str]:
    try:
        return resolve_base_model(svc, ref)
    except UserError:  # e.g. a hub id while offline: it differs from the SFT job's base all the same
        return None
