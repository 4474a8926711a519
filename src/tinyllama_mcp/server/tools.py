"""What each tool does, as plain functions of (Services, input model) -> output model.

Kept apart from the MCP wiring (app.py) so that the logic reads top to bottom and can be called
directly. Mistakes a caller can fix raise `UserError` with the reason and what to do instead.
Nothing here trains: start_* validate, preflight the dataset and enqueue, returning in milliseconds
to a second; the worker runs the job.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline.data import Preflight
from tinyllama_mcp.pipeline.specs import DatasetSpec, DPOSpec, GenerationSpec, MergeSpec, SFTSpec
from tinyllama_mcp.server import job_views
from tinyllama_mcp.server.errors import describe_validation_error
from tinyllama_mcp.server.models import (
    CancelInput, CancelOutput, GenerateInput, GenerateOutput, MergeInput, StartDPOInput, StartJobOutput,
    StartSFTInput, StatusInput, StatusOutput, Usage, _TrainingArgs,
)
from tinyllama_mcp.server.paths import dataset_source
from tinyllama_mcp.server.references import (
    require_job, resolve_base_model, resolve_generate_model, resolved_or_none,
)
from tinyllama_mcp.server.services import Services

_TRAINING_FIELDS = (
    "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "save_steps", "seed", "eval_fraction",
)
_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}


# --------------------------------------------------------------------------- start_* helpers
def _spec(cls: type, data: dict[str, Any]):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"invalid settings: {describe_validation_error(exc)}") from None


def _training(cls: type, args: _TrainingArgs) -> dict[str, Any]:
    training = cls.model_fields["training"].default_factory().model_dump()
    overrides = {name: getattr(args, name) for name in _TRAINING_FIELDS if getattr(args, name) is not None}
    if "num_train_epochs" in overrides and "max_steps" not in overrides:
        overrides["max_steps"] = -1  # epochs were asked for: do not let a default step count cut them short
    training.update(overrides)
    return training


def _lora(args: _TrainingArgs) -> dict[str, Any]:
    return {key: getattr(args, name) for name, key in _LORA_FIELDS.items() if getattr(args, name) is not None}


def _dataset(cls: type, args: Any, roots: list[Path]) -> dict[str, Any]:
    dataset = cls.model_fields["dataset"].default_factory().model_dump()
    if args.dataset is not None:
        dataset = {"source": dataset_source(args.dataset, roots), "split": "train"}
    if args.dataset_split is not None:
        dataset["split"] = args.dataset_split
    if args.max_samples is not None:
        dataset["max_samples"] = args.max_samples
    return dataset


def _validation_dataset(args: Any, roots: list[Path]) -> Optional[dict[str, Any]]:
    if args.validation_dataset is None:
        return None
    return {"source": dataset_source(args.validation_dataset, roots), "split": args.validation_split or "train"}


def _preflight_all(spec: Any, kind: str, base_model: str) -> tuple[Preflight, Optional[Preflight]]:
    """The training data's and the validation data's checks, each local file pinned by its sha256."""
    reports = []
    for dataset in (spec.dataset, spec.validation_dataset):
        report = run_preflight(dataset, kind, spec.training.max_length, base_model) if dataset is not None else None
        if report is not None and report.sha256 and dataset.sha256 is None:
            dataset.sha256 = report.sha256  # train (and validate) on exactly the file that was checked
        reports.append(report)
    train, valid = reports
    if spec.training.eval_fraction > 0 and train.rows < 4:
        raise UserError(f"eval_fraction needs at least 4 rows to hold some out; the dataset has {train.rows}: give "
                        "more rows (max_samples) or a separate validation_dataset")
    return train, valid


def run_preflight(dataset: DatasetSpec, kind: str, max_length: int, base_model: str) -> Preflight:
    """Check the data before queueing: exists, schema, rows, token lengths (pipeline.data.preflight)."""
    from tinyllama_mcp.pipeline.data import preflight

    return preflight(dataset, kind, max_length, base_model)


def enqueue_job(svc: Services, spec: Any, name: Optional[str], preflight: Optional[Preflight], next_step: str,
                validation_preflight: Optional[Preflight] = None) -> StartJobOutput:
    """Queue a stage spec as a new job: its folder and spec.json first, then the store row (every start_* tool)."""
    if name is not None and (alias := svc.aliases.get(name)) is not None:
        raise UserError(f"output_name {name!r} is already an alias (of {alias.target}); choose another name")
    job_id = f"{spec.stage}-{secrets.token_hex(6)}"
    job_dir = svc.settings.jobs_dir / job_id
    try:
        job_dir.mkdir(parents=True, mode=0o700)
        # spec.json exists before the row does: a worker may claim the job the moment it is inserted.
        write_atomic(job_dir / "spec.json", spec.model_dump_json(indent=2))  # never an empty spec.json after a crash
    except OSError as exc:  # a full disk, a read-only or vanished home: the operator's to fix, not a crash
        shutil.rmtree(job_dir, ignore_errors=True)
        raise UserError(
            f"could not create the job folder {job_dir} ({exc.strerror or exc}); free space or fix the "
            f"permissions of {svc.settings.jobs_dir}, then call again"
        ) from None
    try:
        job = svc.store.enqueue(
            job_id=job_id, stage=spec.stage, spec=spec.model_dump(mode="json"), parents=list(spec.parents),
            job_dir=job_dir, name=name, max_attempts=svc.settings.max_attempts, max_queued=svc.settings.max_queued_jobs,
        )
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    waiting = [p for p in job.parents if (parent := svc.store.get(p)) is not None and parent.state != "succeeded"]
    dataset = getattr(spec, "dataset", None)
    return StartJobOutput(
        job_id=job.id, stage=job.stage, state=job.state,
        queue_position=None if waiting else svc.store.queue_position(job.id), waiting_for=waiting,
        base_model=spec.base_model, dataset=dataset.source if dataset is not None else None, output_name=name,
        parents=job.parents, job_dir=str(job_dir), preflight=preflight, validation_preflight=validation_preflight,
        next_step=next_step.format(job_id=job.id),
    )


_POLL = ("Call wait(job_id='{job_id}', timeout_s=600) (it returns once the job ends; again while timed_out is true) "
         "until state is 'succeeded'; ")


# --------------------------------------------------------------------------- the tools
def start_sft(svc: Services, args: StartSFTInput) -> StartJobOutput:
    base_model = resolve_base_model(svc, args.base_model)
    quant = {"quantization": args.quantization} if args.quantization else {}
    spec = _spec(SFTSpec, {
        "base_model": base_model,
        "dataset": _dataset(SFTSpec, args, svc.settings.data_root_paths()),
        "validation_dataset": _validation_dataset(args, svc.settings.data_root_paths()),
        "lora": _lora(args), "quant": quant, "training": _training(SFTSpec, args),
    })
    report, valid_report = _preflight_all(spec, "sft", base_model)
    return enqueue_job(svc, spec, args.output_name, report, _POLL + "then start_dpo(sft_job_id='{job_id}', "
                       "dataset=...) for preference tuning, or merge(sft_job_id='{job_id}') for a standalone model.",
                       valid_report)


def start_dpo(svc: Services, args: StartDPOInput) -> StartJobOutput:
    parents: list[str] = []
    sft_adapter = None
    if args.sft_job_id is not None:
        sft = require_job(svc, args.sft_job_id, "sft", allow_unfinished=True)
        base_model = sft.spec["base_model"]
        if args.base_model is not None and args.base_model != base_model and resolved_or_none(svc, args.base_model) != base_model:
            raise UserError(
                f"base_model {args.base_model!r} differs from the base of SFT job {sft.id} ({base_model}); "
                "omit base_model: DPO always trains on its SFT job's base"
            )
        sft_adapter, parents = str(sft.job_dir / "adapter"), [sft.id]
    else:
        base_model = resolve_base_model(svc, args.base_model)
    quant = {"quantization": args.quantization} if args.quantization else {}
    beta = {"beta": args.beta} if args.beta is not None else {}
    spec = _spec(DPOSpec, {
        "base_model": base_model, "sft_adapter": sft_adapter, "parents": parents, **beta,
        "dataset": _dataset(DPOSpec, args, svc.settings.data_root_paths()),
        "validation_dataset": _validation_dataset(args, svc.settings.data_root_paths()),
        "lora": _lora(args), "quant": quant, "training": _training(DPOSpec, args),
    })
    report, valid_report = _preflight_all(spec, "dpo", base_model)
    return enqueue_job(svc, spec, args.output_name, report, _POLL + "then merge(dpo_job_id='{job_id}') and generate "
                       "from the merged model.", valid_report)


def merge(svc: Services, args: MergeInput) -> StartJobOutput:
    dpo = require_job(svc, args.dpo_job_id, "dpo", allow_unfinished=True) if args.dpo_job_id else None
    sft_id = args.sft_job_id
    if dpo is not None and dpo.parents:
        if sft_id is not None and sft_id != dpo.parents[0]:
            raise UserError(
                f"DPO job {dpo.id} was trained on SFT job {dpo.parents[0]}, not {sft_id}; pass that sft_job_id or omit it"
            )
        sft_id = dpo.parents[0]
    elif dpo is not None and sft_id is not None:
        raise UserError(f"DPO job {dpo.id} was trained straight on its base model; merge it without sft_job_id")
    sft = require_job(svc, sft_id, "sft", allow_unfinished=True) if sft_id else None
    # The first adapter goes into the base; a DPO adapter trained on a base (no SFT) is that first adapter.
    first, second = (sft, dpo) if sft is not None else (dpo, None)
    assert first is not None
    spec = _spec(MergeSpec, {
        "base_model": first.spec["base_model"],
        "sft_adapter": str(first.job_dir / "adapter"),
        "dpo_adapter": str(second.job_dir / "adapter") if second is not None else None,
        "dtype": args.dtype,
        "parents": [job.id for job in (first, second) if job is not None],
    })
    name = args.output_name
    return enqueue_job(svc, spec, name, None, _POLL + f"then generate(model='{name or '{job_id}'}', prompt=...).")


def status(svc: Services, args: StatusInput) -> StatusOutput:
    workers = job_views.workers(svc)
    devices = ", ".join(f"slot {i}: GPU {gpu}" if gpu is not None else f"slot {i}: CPU" for i, gpu in enumerate(svc.devices))
    if not svc.worker_enabled:
        devices += " (jobs run in another process: this server runs no worker)"
    queue = [job.id for job in svc.store.queued()]
    if args.job_id is not None:
        job = svc.store.get(args.job_id)
        if job is None:
            raise UserError(f"no job {args.job_id!r}; call status without job_id to list jobs")
        return StatusOutput(job=job_views.job_view(svc, job, args.log_lines), queue=queue, workers=workers,
                            devices=devices, hint=job_views.hint(job, workers))
    jobs = [job_views.job_view(svc, job, 0) for job in svc.store.recent(args.limit)]
    hint = "" if any(w.alive for w in workers) or not queue else (
        "No worker is alive: queued jobs wait until a server process with TINYLLAMA_MCP_WORKER=1 or "
        "`tinyllama-mcp worker` runs."
    )
    return StatusOutput(jobs=jobs, queue=queue, workers=workers, devices=devices, hint=hint)


def cancel(svc: Services, args: CancelInput) -> CancelOutput:
    previous, job = svc.store.request_cancel(args.job_id)
    if previous in ("succeeded", "failed"):
        raise UserError(f"job {job.id} already {previous}; there is nothing to cancel")
    if previous == "running":
        message = "The worker is stopping the job's processes; status will show 'cancelled' within seconds."
    elif previous == "queued":
        message = "The job left the queue."
    else:
        message = "The job was already cancelled."
    return CancelOutput(job_id=job.id, previous_state=previous, state=job.state,
                        cancel_requested=job.cancel_requested, message=message)


def check_prompt_size(settings, size: int) -> None:
    """The prompt size limit (TINYLLAMA_MCP_MAX_PROMPT_CHARS), shared by MCP generate and /v1."""
    if size > settings.max_prompt_chars:
        raise UserError(
            f"the prompt is {size} characters, over this server's limit of {settings.max_prompt_chars} "
            "(TINYLLAMA_MCP_MAX_PROMPT_CHARS); shorten it"
        )


def generation_spec(settings, explicit: dict[str, Any]) -> GenerationSpec:
    """HF_GENERATE_KWARGS overridden by a call's explicit settings, within the server's limits (MCP generate and /v1)."""
    try:
        spec = GenerationSpec(**{**settings.hf_generate_kwargs, **explicit})
    except ValidationError as exc:
        raise UserError(f"invalid generation settings: {describe_validation_error(exc)}") from None
    if spec.max_new_tokens > settings.max_new_tokens:
        raise UserError(
            f"max_new_tokens {spec.max_new_tokens} is over this server's limit of {settings.max_new_tokens} "
            "(TINYLLAMA_MCP_MAX_NEW_TOKENS); ask for fewer"
        )
    return spec


def prepare_generation(svc: Services, args: GenerateInput) -> tuple[str, str, GenerationSpec]:
    """The checks generate makes before any model loads: limits, settings, and which model."""
    size = len(args.prompt) if args.prompt is not None else sum(len(m.content) for m in args.messages or [])
    check_prompt_size(svc.settings, size)
    explicit = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "do_sample", "seed", "stop")
                if getattr(args, name) is not None}
    spec = generation_spec(svc.settings, explicit)
    model_ref, label = resolve_generate_model(svc, args.model)
    return model_ref, label, spec


async def generate(svc: Services, args: GenerateInput, report_progress=None) -> GenerateOutput:
    """`report_progress(progress, total, message)` (the MCP context's) receives the partial text as it grows."""
    import anyio.to_thread

    model_ref, label, spec = await anyio.to_thread.run_sync(prepare_generation, svc, args)
    if args.messages is not None:
        messages, prompt = [m.model_dump() for m in args.messages], None
    elif args.raw:
        messages, prompt = None, args.prompt
    else:  # a prompt is a question to a chat model: one user turn, in its chat template
        messages, prompt = [{"role": "user", "content": args.prompt}], None
    result = await svc.generators.generate(model_ref, messages, prompt, spec, report_progress)
    return GenerateOutput(
        text=result.text, model=label, finish_reason=result.finish_reason, latency_ms=result.latency_ms,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )


