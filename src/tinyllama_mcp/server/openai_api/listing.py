"""/v1/models is the job store, read at request time: models appear and disappear as jobs finish or go.

Listed: every succeeded SFT or DPO job (served as its base plus the adapter) and every succeeded merge, each
under its job id and under its output_name, plus `tiny-demo` and HF_LOCAL_MODEL_PATH when set, then every servable
alias (its `parent` the target). `parent` is what a model was trained or merged from (a job id, or the base model),
`root` the base model at the start of the chain; extra fields carry its aliases, newest metrics and lineage.
A name resolves as MCP generate resolves it (server.references), so hub ids and local folders work too; a job that
is not (or no longer) servable is a 404 that says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.openai_api.errors import OpenAIError
from tinyllama_mcp.server.lineage_view import ALL_JOBS, JobIndex, job_of_folder, model_facts
from tinyllama_mcp.server.references import SERVABLE_STAGES, alias_model, job_by_ref, resolve_generate_model
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import Job

OWNER = "tinyllama-mcp"
STARTED = int(time.time())  # `created` of the models that are no job


@dataclass(frozen=True)
class ModelCard:
    id: str
    ref: str  # what the generator cache loads
    created: int
    root: str
    parent: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # aliases, metrics, lineage (OpenAI clients ignore them)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": OWNER,
                "root": self.root, "parent": self.parent, **self.extra}


def lineage(svc: Services, job: Job, depth: int = 0) -> tuple[str, str]:
    """(parent, root) of a job's model."""
    if job.parents:
        parent_id = job.parents[-1]
        parent = svc.store.get(parent_id)
        root = lineage(svc, parent, depth + 1)[1] if parent is not None and depth < 32 else job.spec.get("base_model", "")
        return parent_id, root
    base = str(job.spec.get("base_model", ""))
    earlier = job_of_folder(svc, base)
    if earlier is not None and depth < 32:
        return earlier.id, lineage(svc, earlier, depth + 1)[1]
    return base, base


def _job_card(svc: Services, job: Job, name: str, extra: Optional[dict[str, Any]] = None) -> ModelCard:
    folder, _ = resolve_generate_model(svc, job.id)  # UserError when its artifacts were removed
    parent, root = lineage(svc, job)
    return ModelCard(id=name, ref=folder, created=int(job.finished_at or job.created_at), root=root, parent=parent,
                     extra=extra or {})


def _alias_card(svc: Services, name: str, target: str, extra: Optional[dict[str, Any]] = None) -> ModelCard:
    """An alias as a model of its own: served as its target, `parent` the target (UserError when not servable)."""
    ref, _ = alias_model(svc, name, target)
    job = svc.store.get(target)
    root = lineage(svc, job)[1] if job is not None else target
    created = int(job.finished_at or job.created_at) if job is not None else STARTED
    return ModelCard(id=name, ref=ref, created=created, root=root, parent=target,
                     extra={**(extra or {}), "alias_of": target})


def list_models(svc: Services) -> list[ModelCard]:
    index = JobIndex(svc)
    facts = {base: model_facts(svc, index, base, None)
             for base in (TINY_DEMO, svc.settings.hf_local_model_path) if base}
    cards = [ModelCard(id=base, ref=base, created=STARTED, root=base, extra=extra) for base, extra in facts.items()]
    for job in reversed(svc.store.recent(ALL_JOBS)):  # oldest first, as OpenAI lists
        if job.state != "succeeded" or job.stage not in SERVABLE_STAGES:
            continue
        facts[job.id] = model_facts(svc, index, job.id, job)
        for name in (job.id, job.name):
            if name is None:
                continue
            try:
                cards.append(_job_card(svc, job, name, facts[job.id]))
            except UserError:  # its folder is gone: not servable, not listed
                break
    for alias in svc.aliases.all():
        try:
            cards.append(_alias_card(svc, alias.name, alias.target, facts.get(alias.target)))
        except UserError:  # its target failed or was removed: not listed, a request for it says why
            continue
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
        alias = svc.aliases.get(name)
        if alias is not None:
            try:
                return _alias_card(svc, alias.name, alias.target)
            except UserError as exc:
                raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
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
