"""/v1/models is the job store, read at request time: models appear and disappear as jobs finish or go.

Listed: every succeeded SFT or DPO job (served as its base plus the adapter) and every succeeded merge, each
under its job id and under its output_name, plus `tiny-demo` and HF_LOCAL_MODEL_PATH when set. `parent` is what
a model was trained or merged from (a job id, or the base model), `root` the base model at the start of the chain.
A name resolves as MCP generate resolves it (server.references), so hub ids and local folders work too; a job that
is not (or no longer) servable is a 404 that says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.openai_api.errors import OpenAIError
from tinyllama_mcp.server.references import JOB_ID, job_by_ref, resolve_generate_model
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import Job

OWNER = "tinyllama-mcp"
STARTED = int(time.time())  # `created` of the models that are no job
ALL_JOBS = 1_000_000  # the store has no "every job" query; recent() with a limit no store reaches


@dataclass(frozen=True)
class ModelCard:
    id: str
    ref: str  # what the generator cache loads
    created: int
    root: str
    parent: Optional[str] = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": OWNER,
                "root": self.root, "parent": self.parent}


def _job_of_folder(svc: Services, base: str) -> Optional[Job]:
    """The job whose merged/ folder `base` is (a base model that is an earlier merge), if any."""
    folder = Path(base)
    if folder.name != "merged" or not JOB_ID.match(folder.parent.name):
        return None
    if folder.parent.parent.resolve() != svc.settings.jobs_dir.resolve():
        return None
    return svc.store.get(folder.parent.name)


def lineage(svc: Services, job: Job, depth: int = 0) -> tuple[str, str]:
    """(parent, root) of a job's model."""
    if job.parents:
        parent_id = job.parents[-1]
        parent = svc.store.get(parent_id)
        root = lineage(svc, parent, depth + 1)[1] if parent is not None and depth < 32 else job.spec.get("base_model", "")
        return parent_id, root
    base = str(job.spec.get("base_model", ""))
    earlier = _job_of_folder(svc, base)
    if earlier is not None and depth < 32:
        return earlier.id, lineage(svc, earlier, depth + 1)[1]
    return base, base


def _job_card(svc: Services, job: Job, name: str) -> ModelCard:
    folder, _ = resolve_generate_model(svc, job.id)  # UserError when its artifacts were removed
    parent, root = lineage(svc, job)
    return ModelCard(id=name, ref=folder, created=int(job.finished_at or job.created_at), root=root, parent=parent)


def list_models(svc: Services) -> list[ModelCard]:
    cards = [ModelCard(id=TINY_DEMO, ref=TINY_DEMO, created=STARTED, root=TINY_DEMO)]
    local = svc.settings.hf_local_model_path
    if local:
        cards.append(ModelCard(id=local, ref=local, created=STARTED, root=local))
    for job in reversed(svc.store.recent(ALL_JOBS)):  # oldest first, as OpenAI lists
        if job.state != "succeeded":
            continue
        for name in (job.id, job.name):
            if name is None:
                continue
            try:
                cards.append(_job_card(svc, job, name))
            except UserError:  # its folder is gone: not servable, not listed
                break
    return cards


def _not_servable(name: str, job: Job) -> str:
    said = f"model {name!r} is job {job.id}" if name != job.id else f"model {name!r}"
    if job.state in ("queued", "running"):
        return f"{said}, which is still {job.state}; it is served once status(job_id='{job.id}') shows 'succeeded'"
    if job.state == "cancelled":
        return f"{said} was cancelled before it finished, so it has no model to serve; start the stage again"
    reason = (job.error or "no reason recorded").strip().splitlines()[0][:300]
    return f"{said} failed ({reason}), so it has no model to serve; fix the cause and start the stage again"


def find_model(svc: Services, name: str) -> ModelCard:
    """The model a request names, or OpenAIError 404 saying why there is none (blocking: the store, the disk)."""
    if name == TINY_DEMO:
        return ModelCard(id=name, ref=name, created=STARTED, root=name)
    if name == svc.settings.hf_local_model_path:
        return ModelCard(id=name, ref=name, created=STARTED, root=name)
    try:
        job = job_by_ref(svc, name)
        if job is not None:
            if job.state != "succeeded":
                raise OpenAIError(404, _not_servable(name, job), param="model", code="model_not_found")
            try:
                return _job_card(svc, job, name)
            except UserError as exc:
                raise OpenAIError(404, f"model {name!r}: {exc}", param="model", code="model_not_found") from None
        ref, _ = resolve_generate_model(svc, name)  # a hub id or a local folder, as MCP generate takes them
    except UserError as exc:
        raise OpenAIError(404, f"model {name!r} does not exist here ({exc}); GET /v1/models lists the models this "
                          "server serves", param="model", code="model_not_found") from None
    return ModelCard(id=name, ref=ref, created=STARTED, root=ref)


def retrieve_model(svc: Services, name: str) -> ModelCard:
    """GET /v1/models/{name}: a listed model only (hub ids and folders are served, not listed), else the 404
    find_model words for it."""
    for card in list_models(svc):
        if card.id == name:
            return card
    find_model(svc, name)  # raises the 404 that says why, for a job or a name that resolves to nothing
    raise OpenAIError(404, f"model {name!r} is not one of the models this server lists (GET /v1/models); chat and "
                      "completions still accept it as a hub id or local folder, as MCP generate does",
                      param="model", code="model_not_found")
