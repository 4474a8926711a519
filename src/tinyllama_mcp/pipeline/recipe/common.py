"""What the SFT and DPO stages share: their inputs, trainer arguments, resume, the adapter, eval samples, lineage."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tinyllama_mcp.pipeline import data as data_mod
from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline.checkpoints import latest_complete
from tinyllama_mcp.pipeline.data import LoadedData, length_stats, over_length_warning, token_lengths
from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.lineage import write_lineage
from tinyllama_mcp.pipeline.speed.plan import Plan
from tinyllama_mcp.pipeline.specs import GenerationSpec, LoraSpec, TrainingSpec


def lora_config(lora: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def trainer_kwargs(t: TrainingSpec, dtype: torch.dtype, output_dir: Path, plan: Plan) -> dict[str, Any]:
    """TrainingArguments fields shared by SFTConfig and DPOConfig: the recipe's from the spec, the micro-batch
    shape, optimizer, checkpointing and speed levers from the stage's plan."""
    if plan.dataloader_workers:
        # The workers are forked after the tokenizer ran: its own threads stay off in them (and no warning says so).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return dict(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        num_train_epochs=t.num_train_epochs,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_total_limit=t.save_total_limit,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        per_device_eval_batch_size=plan.batch_size,  # validation batches shaped as the training micro-batches
        **plan.trainer_args(),
    )


def total_steps(rows: int, t: TrainingSpec, plan: Optional[Plan] = None) -> int:
    """The optimizer steps the Trainer will run (same arithmetic as its own), after the plan's step shape (without
    one, the recipe's)."""
    batch, accumulation, max_steps = t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_steps
    if plan is not None:
        batch, accumulation, max_steps = plan.batch_size, plan.accumulation, plan.max_steps
    if max_steps > 0:
        return max_steps
    per_epoch = max(math.ceil(math.ceil(rows / batch) / accumulation), 1)
    return math.ceil(t.num_train_epochs * per_epoch)


def mean_row_tokens(lengths: list[int], max_length: int) -> Optional[float]:
    """Mean tokens of a row after truncation to max_length (sizes token-budget optimizer steps)."""
    if not lengths:
        return None
    return sum(min(n, max_length) for n in lengths) / len(lengths)


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if fraction <= 0 or len(rows) < 4:
        return rows, []
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def warn_long_rows(log: EventLog, data: LoadedData, kind: str, tokenizer, max_length: int,
                   keep: Optional[list] = None) -> dict:
    """Length stats of the rows, with a warning event when some exceed max_length.

    `keep`: a list that receives the per-row token lengths (the stages size token-budget steps with them).
    """
    def encode(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    lengths = token_lengths(data.rows, kind, encode)
    if keep is not None:
        keep.extend(lengths)
    stats = length_stats(lengths, max_length)
    warning = over_length_warning(stats, len(data.rows), max_length)
    if warning:
        log.emit("warning", message=warning)
    return stats.model_dump()


def run_trainer(trainer, job_dir: Path, log: EventLog, start_fields: dict) -> Optional[dict]:
    """Train, resuming from the newest intact checkpoint in JOB_DIR/checkpoints if there is one; then every held-out
    row scored (its batches are the training collator's: call it where training runs). Returns validation's record."""
    from tinyllama_mcp.pipeline.recipe import validation

    resume = latest_complete(job_dir / "checkpoints")
    resume_step = None
    if resume is not None:
        resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
    log.emit("start", resume_step=resume_step, **start_fields)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return validation.finish(trainer, log)


def save_adapter(
    trainer, tokenizer, job_dir: Path, base_model: str, quant, parents: list[str], log: EventLog, policy_quant=None
) -> Path:
    """Write JOB_DIR/adapter (weights, tokenizer, stack.json) via a temporary folder and a rename."""
    final = job_dir / "adapter"
    tmp = job_dir / ".adapter.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    modeling.write_stack(final, base_model, quant, parents, policy_quant)
    log.emit("artifact", kind="adapter", path=str(final))
    return final


def write_eval_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, job_dir: Path, log: EventLog) -> None:
    """Answer the fixed prompt set greedily with the trained model; saved as eval_samples.jsonl."""
    from tinyllama_mcp.pipeline.generate import generate_ids, render_input

    model.eval()
    model.config.use_cache = True
    spec = GenerationSpec(max_new_tokens=max_new_tokens, temperature=0.0)
    lines = []
    for prompt in prompts:
        ids = render_input(tokenizer, [{"role": "user", "content": prompt}], None)
        answer = tokenizer.decode(generate_ids(model, tokenizer, ids, spec), skip_special_tokens=True).strip()
        lines.append(json.dumps({"prompt": prompt, "answer": answer}))
    path = job_dir / "eval_samples.jsonl"
    write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
    log.emit("eval", samples=str(path), count=len(lines))
    log.emit("artifact", kind="eval_samples", path=str(path))


def finish(
    trainer, tokenizer, spec, job_dir: Path, log: EventLog, summary: dict, *,
    resolved_base: str, data: LoadedData, lengths: dict, stack_base: str, stack_quant, stack_parents: list[str],
    effective: dict[str, Any], stack_policy_quant=None, validation: Optional[dict] = None,
) -> dict:
    """After training (and validation, whose record run_trainer returned): adapter, eval samples, lineage; returns
    the end summary."""
    save_adapter(trainer, tokenizer, job_dir, stack_base, stack_quant, stack_parents, log, stack_policy_quant)
    write_eval_samples(
        trainer.model, tokenizer, spec.eval_prompts.prompts, spec.eval_prompts.max_new_tokens, job_dir, log
    )
    datasets = [{"source": data.source, "path": data.path, "sha256": data.sha256, "rows": len(data.rows),
                 "layout": data.layout, "token_lengths": lengths}]
    path = write_lineage(job_dir, spec, resolved_base, datasets, effective, validation)
    log.emit("artifact", kind="lineage", path=str(path))
    if validation is not None:
        summary.update(validation["full"], best_checkpoint=validation["best_checkpoint"])
    summary["peak_memory_gib"] = modeling.peak_memory_gib()
    if summary.get("runtime_s") and summary.get("tokens_this_run"):
        summary["tokens_per_s"] = round(summary["tokens_this_run"] / summary["runtime_s"], 1)
    return summary


@dataclass
class StageInputs:
    """What SFT and DPO load before any model: checked data, dtype, base, tokenizer, length stats."""

    data: LoadedData
    dtype: torch.dtype
    base: str  # the resolved base model (path or hub id)
    tokenizer: Any
    lengths: dict  # token-length stats, for lineage
    mean_tokens: Optional[float]  # mean row tokens after truncation, for token-budget steps
    row_lengths: list[int]  # each row's tokens before truncation (SFT: the packed widths 'auto' cuda_graphs counts)


def load_inputs(spec, kind: str, log: EventLog) -> StageInputs:
    # Bad data is the commonest user error: report it before loading any model.
    data = data_mod.load(spec.dataset, kind)
    dtype = modeling.compute_dtype(spec.quant.compute_dtype)
    base = modeling.resolve_model(spec.base_model)
    tokenizer = modeling.load_tokenizer(base)
    row_lengths: list[int] = []
    lengths = warn_long_rows(log, data, kind, tokenizer, spec.training.max_length, keep=row_lengths)
    return StageInputs(data, dtype, base, tokenizer, lengths, mean_row_tokens(row_lengths, spec.training.max_length),
                       row_lengths)


def start_fields(stage: str, effective: dict[str, Any], rows: int, plan: Plan) -> dict[str, Any]:
    """The `start` event's fields."""
    return dict(stage=stage, device=effective["device"], dtype=effective["compute_dtype"],
                total_steps=effective["total_steps"], rows=rows, levers=plan.effective())


def base_effective(dtype: torch.dtype, t: TrainingSpec, rows: int, plan: Plan) -> dict[str, Any]:
    """What the stage really ran with, for lineage: device, dtype, optimizer, steps, and every lever."""
    return {
        "device": modeling.device_name(),
        "compute_dtype": modeling.dtype_name(dtype),
        "optim": plan.optim,
        "total_steps": total_steps(rows, t, plan),
        **plan.effective(),
    }

