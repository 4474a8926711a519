"""Evaluate stage: one servable model -> JOB_DIR/evaluation/{metrics.json, generations.jsonl}.

Load the inputs (bad data fails before any model loads), load the model as generate does, then each measure the
spec asks for: chat loss, preference pairs, greedy answers to the prompts, lm-eval tasks. metrics.json is the
contract the server and other tools read:
{"model", "model_ref", "metrics": {chat_loss, chat_perplexity, chat_token_accuracy, preference_accuracy,
preference_margin, lm_eval: {task: {metric: value}}}, "datasets": [{kind, source, sha256, rows}],
"generations": "generations.jsonl"}, each part present only when asked for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline import data as data_mod
from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.evaluation.results import GENERATIONS, METRICS, OUTPUT
from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.lineage import write_lineage
from tinyllama_mcp.pipeline.specs import EvaluateSpec, GenerationSpec


def _entry(kind: str, loaded: data_mod.LoadedData) -> dict:
    return {"kind": kind, "source": loaded.source, "sha256": loaded.sha256, "rows": len(loaded.rows)}


def _resolved_base(model_ref: str) -> str:
    """What the model stands on, for lineage: an adapter's stack base, else the model itself."""
    from tinyllama_mcp.pipeline.generate import resolve_ref

    kind, path = resolve_ref(model_ref)
    return modeling.read_stack(path)["base_model"] if kind == "adapter" else path


def write_generations(generator, prompts: list[str], max_new_tokens: int, path: Path) -> None:
    """Each prompt as one user turn, answered greedily (the same answer every run), one JSON line each."""
    spec = GenerationSpec(max_new_tokens=max_new_tokens, temperature=0.0)
    lines = []
    for index, prompt in enumerate(prompts):
        result = generator.generate(messages=[{"role": "user", "content": prompt}], spec=spec)
        lines.append(json.dumps({"index": index, "prompt": prompt, "answer": result.text,
                                 "finish_reason": result.finish_reason, "completion_tokens": result.completion_tokens}))
    write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def run_evaluate(spec: EvaluateSpec, job_dir: Path, log: EventLog) -> dict:
    t0 = time.time()
    chat = data_mod.load(spec.chat_dataset, "sft") if spec.chat_dataset else None
    pairs = data_mod.load(spec.preference_dataset, "dpo") if spec.preference_dataset else None
    task_digest = None
    if spec.lm_eval_tasks:
        from tinyllama_mcp.pipeline.evaluation import harness

        task_digest = harness.checked_digest(spec)

    from tinyllama_mcp.pipeline.evaluation import scoring
    from tinyllama_mcp.pipeline.generate import load_generator

    generator = load_generator(spec.model)
    model, tokenizer = generator.model, generator.tokenizer
    parts = [part for part, asked in (("chat", chat), ("preference", pairs), ("prompts", spec.prompts),
                                      ("lm_eval", spec.lm_eval_tasks)) if asked]
    dtype = modeling.dtype_name(next(model.parameters()).dtype)
    log.emit("start", stage="evaluate", device=modeling.device_name(), dtype=dtype, resume_step=None,
             total_steps=len(parts), rows=sum(len(d.rows) for d in (chat, pairs) if d) + len(spec.prompts))

    tmp, final = job_dir / ".evaluation.tmp", job_dir / OUTPUT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    metrics: dict = {}
    datasets: list[dict] = []
    summary: dict = {"model": spec.model_label}
    record: dict = {"model": spec.model_label, "model_ref": spec.model, "metrics": metrics, "datasets": datasets}

    def done(part: str) -> None:
        log.emit("step", step=parts.index(part) + 1, total=len(parts), part=part)

    if chat is not None:
        values, summary["chat_tokens"] = scoring.chat_metrics(model, tokenizer, chat.rows, spec.max_length, spec.batch_size)
        metrics.update(values)
        datasets.append(_entry("chat", chat))
        done("chat")
    if pairs is not None:
        values, summary["preference_pairs"] = scoring.preference_metrics(model, tokenizer, pairs.rows, spec.max_length,
                                                                         spec.batch_size)
        metrics.update(values)
        datasets.append(_entry("preference", pairs))
        done("preference")
    if spec.prompts:
        write_generations(generator, spec.prompts, spec.max_new_tokens, tmp / GENERATIONS)
        digest = hashlib.sha256(json.dumps(spec.prompts).encode()).hexdigest()
        datasets.append({"kind": "prompts", "source": "spec.prompts", "sha256": digest, "rows": len(spec.prompts)})
        record["generations"] = GENERATIONS
        done("prompts")
    generator.close()  # the engine's thread, if generation started one
    if spec.lm_eval_tasks:
        metrics["lm_eval"], documents = harness.run_tasks(model, tokenizer, spec, job_dir / "work" / "lm_eval_tasks")
        datasets.append({"kind": "lm_eval", "source": spec.lm_eval_task_dir, "sha256": task_digest, "rows": documents})
        done("lm_eval")

    write_atomic(tmp / METRICS, json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(job_dir / "work", ignore_errors=True)
    log.emit("artifact", kind="evaluation", path=str(final))
    log.emit("artifact", kind="metrics", path=str(final / METRICS))
    if spec.prompts:
        log.emit("artifact", kind="generations", path=str(final / GENERATIONS))
    effective = {"device": modeling.device_name(), "dtype": dtype, "model_ref": spec.model}
    lineage = write_lineage(job_dir, spec, _resolved_base(spec.model), datasets, effective)
    log.emit("artifact", kind="lineage", path=str(lineage))
    summary.update(measured=parts, runtime_s=round(time.time() - t0, 3))
    return summary
