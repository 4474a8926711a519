"""The alias tools as plain functions of (Services, input, caller): promote, rollback, aliases.

An alias points at a servable model: a succeeded SFT/DPO/merge job (kept by its id), 'tiny-demo', or
HF_LOCAL_MODEL_PATH's model. generate, /v1 and the huggingface provider accept an alias wherever they take a model.
"""

from __future__ import annotations

from typing import Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.alias_models import AliasesInput, AliasesOutput, AliasMoveOutput, AliasView, PromoteInput, RollbackInput
from tinyllama_mcp.server.alias_store import Alias
from tinyllama_mcp.server.lineage_view import iso, move_view
from tinyllama_mcp.server.references import JOB_ID, alias_model, job_by_ref, job_model, target_model
from tinyllama_mcp.server.services import Services


def servable_target(svc: Services, model: str) -> str:
    """What an alias may point at, as it is kept: a job id, 'tiny-demo' or HF_LOCAL_MODEL_PATH's value."""
    local = svc.settings.hf_local_model_path
    if model == TINY_DEMO or (local and model == local):
        return model
    alias = svc.aliases.get(model)
    if alias is not None:
        alias_model(svc, alias.name, alias.target)  # refuses an alias whose target cannot be served
        return alias.target
    job = job_by_ref(svc, model)
    if job is None:
        raise UserError(f"model {model!r} is neither a job id, an output_name, an alias, 'tiny-demo' nor "
                        "HF_LOCAL_MODEL_PATH's model; an alias points at a model this server trained or serves "
                        "(call status to list jobs)")
    job_model(svc, job)  # a succeeded SFT/DPO/merge job whose artifacts are there
    return job.id


def _check_free(svc: Services, name: str) -> None:
    """A new alias must not hide a job's output_name or HF_LOCAL_MODEL_PATH."""
    if svc.aliases.get(name) is not None:
        return
    taken = svc.store.find_by_name(name)
    if taken is not None:
        raise UserError(f"alias {name!r} is already the output_name of job {taken.id}; pick another alias name, "
                        f"or promote that job under a different alias")
    if name == svc.settings.hf_local_model_path:
        raise UserError(f"alias {name!r} would hide HF_LOCAL_MODEL_PATH's model of that name; pick another name")


def alias_view(svc: Services, alias: Alias, history: int) -> AliasView:
    try:
        alias_model(svc, alias.name, alias.target)
        problem = None
    except UserError as exc:
        problem = str(exc)
    job = svc.store.get(alias.target) if JOB_ID.match(alias.target) else None
    return AliasView(
        alias=alias.name, target=alias.target, target_output_name=job.name if job is not None else None,
        servable=problem is None, problem=problem, updated_at=iso(alias.updated_at) or "",
        rollback_to=svc.aliases.earlier_target(alias.name),
        history=[move_view(m) for m in svc.aliases.history(alias.name, history)] if history else [],
    )


def _moved(svc: Services, name: str, move) -> AliasMoveOutput:
    alias = svc.aliases.get(name)
    assert alias is not None
    return AliasMoveOutput(
        alias=alias_view(svc, alias, 5), move=move_view(move),
        next_step=f"generate(model='{name}', ...) and /v1 model '{name}' now answer from {move.target}; "
                  f"rollback(alias='{name}') moves it back.",
    )


def promote(svc: Services, args: PromoteInput, by: Optional[str] = None) -> AliasMoveOutput:
    _check_free(svc, args.alias)
    target = servable_target(svc, args.model)
    move = svc.aliases.promote(args.alias, target, reason=args.reason, by=by)
    return _moved(svc, args.alias, move)


def rollback(svc: Services, args: RollbackInput, by: Optional[str] = None) -> AliasMoveOutput:
    if svc.aliases.get(args.alias) is None:
        raise UserError(f"there is no alias {args.alias!r}; call aliases() to list them, or promote a model to it")
    earlier = svc.aliases.earlier_target(args.alias)
    if earlier is not None:
        try:
            target_model(svc, earlier)
        except UserError as exc:
            raise UserError(f"cannot roll back {args.alias!r} to {earlier}: {exc}; promote a servable model "
                            "to it instead") from None
    move = svc.aliases.rollback(args.alias, expected=earlier, reason=args.reason, by=by)
    return _moved(svc, args.alias, move)


def aliases(svc: Services, args: AliasesInput) -> AliasesOutput:
    if args.alias is not None:
        alias = svc.aliases.get(args.alias)
        if alias is None:
            raise UserError(f"there is no alias {args.alias!r}; omit alias to list them all")
        return AliasesOutput(aliases=[alias_view(svc, alias, args.history)])
    return AliasesOutput(aliases=[alias_view(svc, alias, args.history) for alias in svc.aliases.all()])
