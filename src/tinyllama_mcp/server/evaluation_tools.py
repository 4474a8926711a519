"""evaluate, compare, compare_results and judge as plain functions of (Services, input model) -> output model.

evaluate queues one evaluate job (pipeline/evaluation) for any model generate serves. compare queues one per model
with the same evaluation, or reuses an earlier job with an identical one, and records a comparison
(server/comparisons.py). compare_results shows the metric table and the answers to each prompt as blinded pairs;
judge records the caller's verdicts and only then says which model wrote which answer. With more than two models,
every pair is the first model (the baseline) against one other; its answer then appears once per challenger for a
prompt, so strict blinding is for two models at a time.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.evaluation.results import read_generations, read_metrics
from tinyllama_mcp.pipeline.specs import DatasetSpec, EvaluateSpec
from tinyllama_mcp.server import comparisons
from tinyllama_mcp.server.errors import describe_validation_error
from tinyllama_mcp.server.evaluation_models import (
    BlindPair, CompareInput, CompareOutput, CompareResultsInput, CompareResultsOutput, ComparedModel, EvaluateInput,
    EvaluateOutput, JudgeInput, JudgeOutput, MetricRow, ModelScore, UnblindedPair, _EvaluationArgs,
)
from tinyllama_mcp.server.paths import dataset_source, resolve_local
from tinyllama_mcp.server.references import JOB_ID, resolve_generate_model
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import Job
from tinyllama_mcp.server.tools import check_prompt_size, enqueue_job, run_preflight

_KINDS = {"chat_dataset": ("chat", "sft"), "preference_dataset": ("preference", "dpo")}  # field -> (name, data kind)


# --------------------------------------------------------------------------- building the spec
def _checked_spec(data: dict[str, Any]) -> EvaluateSpec:
    try:
        return EvaluateSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"invalid evaluation: {describe_validation_error(exc)}") from None


def _evaluation(svc: Services, args: _EvaluationArgs, model_ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the spec fields every model of a call shares, the datasets' preflight reports by kind). Data is checked
    here, before queueing, as start_sft and start_dpo check theirs; its sha256 goes into the spec."""
    fields: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    max_length = args.max_length or EvaluateSpec.model_fields["max_length"].default
    roots = svc.settings.data_root_paths()
    for name, (kind, data_kind) in _KINDS.items():
        text = getattr(args, name)
        if text is None:
            continue
        dataset = DatasetSpec(source=dataset_source(text, roots), split=args.dataset_split or "train",
                              max_samples=args.max_samples)
        report = run_preflight(dataset, data_kind, max_length, model_ref)
        dataset.sha256 = report.sha256  # measure exactly the file that was checked
        fields[name], reports[kind] = dataset.model_dump(), report
    if args.prompts:
        for prompt in args.prompts:
            check_prompt_size(svc.settings, len(prompt))
        fields["prompts"] = list(args.prompts)
    if args.max_new_tokens is not None:
        if args.max_new_tokens > svc.settings.max_new_tokens:
            raise UserError(f"max_new_tokens {args.max_new_tokens} is over this server's limit of "
                            f"{svc.settings.max_new_tokens} (TINYLLAMA_MCP_MAX_NEW_TOKENS); ask for fewer")
        fields["max_new_tokens"] = args.max_new_tokens
    if args.max_length is not None:
        fields["max_length"] = args.max_length
    fields.update(_lm_eval(svc, args))
    return fields, reports


def _lm_eval(svc: Services, args: _EvaluationArgs) -> dict[str, Any]:
    if not args.lm_eval_tasks and not args.lm_eval_task_dir:
        return {}
    if not (args.lm_eval_tasks and args.lm_eval_task_dir):
        raise UserError("lm_eval_tasks and lm_eval_task_dir go together: name the tasks and the folder defining them")
    if find_spec("lm_eval") is None:
        raise UserError("lm_eval_tasks need lm-evaluation-harness, which this server lacks: pip install lm-eval "
                        "(or tinyllama-mcp[eval]) and restart it")
    from tinyllama_mcp.pipeline.evaluation.task_files import check_task_dir

    folder = resolve_local(args.lm_eval_task_dir, svc.settings.data_root_paths(), "lm_eval_task_dir")
    digest = check_task_dir(folder, args.lm_eval_tasks)
    return {"lm_eval_tasks": list(args.lm_eval_tasks), "lm_eval_task_dir": str(folder), "lm_eval_sha256": digest,
            "lm_eval_limit": args.max_samples}


def _model_job(svc: Services, model_ref: str) -> Optional[Job]:
    """The job whose folder holds `model_ref` (an adapter or merged folder), else None."""
    try:
        relative = Path(model_ref).resolve().relative_to(svc.settings.jobs_dir.resolve())
    except (ValueError, OSError):
        return None
    return svc.store.get(relative.parts[0]) if relative.parts and JOB_ID.match(relative.parts[0]) else None


def _model_spec(svc: Services, model_ref: str, label: str, shared: dict[str, Any]) -> EvaluateSpec:
    """The evaluate spec of one model as resolve_generate_model resolved it, with its base and parent job."""
    job = _model_job(svc, model_ref)
    base = job.spec.get("base_model", model_ref) if job is not None else model_ref
    return _checked_spec({**shared, "model": model_ref, "model_label": label, "base_model": base,
                          "parents": [job.id] if job is not None else []})


_POLL = ("Call wait(job_id='{job_id}', timeout_s=600) (again while timed_out is true) until state is 'succeeded'; "
         "status(job_id='{job_id}') then shows the metrics under evaluation, the answers are in "
         "evaluation/generations.jsonl. ")


# --------------------------------------------------------------------------- the tools
def evaluate(svc: Services, args: EvaluateInput) -> EvaluateOutput:
    model_ref, label = resolve_generate_model(svc, args.model)  # an unknown model fails before any data is read
    shared, reports = _evaluation(svc, args, model_ref)
    spec = _model_spec(svc, model_ref, label, shared)
    first = next(iter(reports.values()), None)
    literal = repr(args.model).replace("{", "{{").replace("}", "}}")  # next_step is a format string
    queued = enqueue_job(svc, spec, None, first, _POLL + "To rank it against other models call "
                         f"compare(models=[{literal}, ...]) with the same inputs.")
    return EvaluateOutput(**queued.model_dump(exclude={"preflight"}), preflight=first, preflights=reports)


def _reusable(svc: Services, spec: EvaluateSpec) -> Optional[Job]:
    """An evaluate job of the same model with an identical evaluation, succeeded (preferred) or still under way."""
    key = spec.evaluation_key()
    found = None
    for job in svc.store.of_stage("evaluate", ("succeeded", "running", "queued")):
        try:
            same = EvaluateSpec.model_validate(job.spec).evaluation_key() == key
        except ValidationError:  # a spec from another version of the server
            continue
        if same and (job.state != "succeeded" or read_metrics(job.job_dir) is not None):
            if job.state == "succeeded":
                return job
            found = found or job
    return found


def compare(svc: Services, args: CompareInput) -> CompareOutput:
    resolved = [resolve_generate_model(svc, ref) for ref in args.models]
    if len({model_ref for model_ref, _ in resolved}) != len(resolved):
        raise UserError(f"two of the models {args.models} name the same model; compare different models")
    shared, _ = _evaluation(svc, args, resolved[0][0])
    models = []
    for ref, (model_ref, label) in zip(args.models, resolved):
        spec = _model_spec(svc, model_ref, label, shared)
        job = _reusable(svc, spec)
        job_id = job.id if job is not None else enqueue_job(svc, spec, None, None, "").job_id
        models.append({"ref": ref, "model": label, "job_id": job_id, "reused": job is not None})
    record = comparisons.create(svc.settings.home, models, shared.get("prompts", []), shared)
    return CompareOutput(
        comparison_id=record["comparison_id"], models=_compared(svc, record), pairs=len(record["pairs"]),
        next_step=f"Call wait(job_id=...) on each job above, or compare_results(comparison_id='{record['comparison_id']}')"
        " every 10-30 s, until its state is 'ready'; it then shows the metric table and the blinded answer pairs.",
    )


def _compared(svc: Services, record: dict) -> list[ComparedModel]:
    out = []
    for entry in record["models"]:
        job = svc.store.get(entry["job_id"])
        state = job.state if job is not None else "failed"
        error = (job.error if job is not None else "the evaluate job is gone from the job store")
        if state == "succeeded" and read_metrics(job.job_dir) is None:
            state, error = "failed", f"job {job.id} has no evaluation/metrics.json; its files were removed"
        out.append(ComparedModel(model=entry["model"], job_id=entry["job_id"], state=state, reused=entry["reused"],
                                 error=error if state in ("failed", "cancelled") else None))
    return out


def _ready(svc: Services, record: dict) -> tuple[str, list[ComparedModel]]:
    models = _compared(svc, record)
    if any(m.state in ("failed", "cancelled") for m in models):
        return "failed", models
    return ("ready" if all(m.state == "succeeded" for m in models) else "pending"), models


def compare_results(svc: Services, args: CompareResultsInput) -> CompareResultsOutput:
    record = comparisons.load(svc.settings.home, args.comparison_id)
    state, models = _ready(svc, record)
    cid = record["comparison_id"]
    if state != "ready":
        bad = [f"{m.job_id} ({m.model}): {m.state}, {m.error}" for m in models if m.state in ("failed", "cancelled")]
        next_step = (f"Evaluate job(s) {'; '.join(bad)}. Fix the cause and call compare again." if bad else
                     f"Jobs are still queued or running; call compare_results(comparison_id='{cid}') again in 10-30 s.")
        return CompareResultsOutput(comparison_id=cid, state=state, models=models, judged=len(record["verdicts"]),
                                    next_step=next_step)
    jobs = [svc.store.get(m.job_id) for m in models]
    table = [MetricRow(model=m.model, job_id=m.job_id, metrics=read_metrics(job.job_dir)["metrics"])
             for m, job in zip(models, jobs)]
    answers = [[line["answer"] for line in read_generations(job.job_dir)] for job in jobs]
    pairs = [BlindPair(pair_id=p["pair_id"], prompt=record["prompts"][p["prompt"]], A=answers[p["a"]][p["prompt"]],
                       B=answers[p["b"]][p["prompt"]]) for p in record["pairs"]]
    next_step = (f"Judge each pair: judge(comparison_id='{cid}', verdicts=[{{'pair_id': ..., 'winner': 'A'|'B'|'tie'}}, "
                 "...]); judge returns each model's win rate and reveals which model wrote A and B of judged pairs."
                 if pairs else "The metric table is complete; this comparison had no prompts, so there is nothing to judge.")
    return CompareResultsOutput(comparison_id=cid, state="ready", models=models, table=table, pairs=pairs,
                                judged=len(record["verdicts"]), next_step=next_step)


def judge(svc: Services, args: JudgeInput) -> JudgeOutput:
    record = comparisons.load(svc.settings.home, args.comparison_id)
    cid = record["comparison_id"]
    state, _ = _ready(svc, record)
    if state != "ready":
        raise UserError(f"comparison {cid} has no results to judge yet (its jobs are {state}); call "
                        f"compare_results(comparison_id='{cid}') until state is 'ready', then judge its pairs")
    if not record["pairs"]:
        raise UserError(f"comparison {cid} was made without prompts, so it has no answer pairs to judge")
    verdicts: dict[str, str] = {}
    for verdict in args.verdicts:
        if verdict.pair_id in verdicts:
            raise UserError(f"pair {verdict.pair_id} is judged twice in this call; give one verdict per pair")
        verdicts[verdict.pair_id] = verdict.winner
    record = comparisons.record_verdicts(svc.settings.home, cid, verdicts)
    left = len(record["pairs"]) - len(record["verdicts"])
    return JudgeOutput(
        comparison_id=cid, judged=len(record["verdicts"]), total_pairs=len(record["pairs"]),
        scores=[ModelScore(**row) for row in comparisons.scores(record)],
        unblinded=[UnblindedPair(**pair) for pair in comparisons.unblinded(record)],
        next_step=(f"{left} pair(s) still unjudged; judge them with the same call." if left else
                   "Every pair is judged: scores are final. A verdict can still be replaced by judging its pair again."),
    )
