"""SFT stage: base model + chat data -> LoRA adapter (QLoRA on an NF4 base by default)."""

from __future__ import annotations

from pathlib import Path

from pipeline import data as data_mod
from pipeline import fast, modeling, training
from pipeline.events import EventLog, make_callback
from pipeline.specs import SFTSpec


def sft_config(spec: SFTSpec, dtype, output_dir: Path, levers=None):
    from trl import SFTConfig

    return SFTConfig(
        **training.trainer_kwargs(spec.training, dtype, output_dir, levers),
        max_length=spec.training.max_length,
        packing=False,
        eval_strategy="no",
    )


def run_sft(spec: SFTSpec, job_dir: Path, log: EventLog) -> dict:
    # Bad data is the commonest user error: report it before importing TRL or loading any model.
    data = data_mod.load(spec.dataset, "sft")

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    dtype = modeling.compute_dtype(spec.quant.compute_dtype)
    base = modeling.resolve_model(spec.base_model)
    tokenizer = modeling.load_tokenizer(base)
    row_lengths: list[int] = []
    lengths = training.warn_long_rows(log, data, "sft", tokenizer, spec.training.max_length, keep=row_lengths)
    train_rows, eval_rows = training.split_eval(data.rows, spec.training.eval_fraction, spec.training.seed)

    model = modeling.load_base(base, spec.quant, dtype)
    levers = fast.resolve(spec.training, "sft", model.config, dtype, rows=len(train_rows),
                          mean_tokens=training.mean_row_tokens(row_lengths, spec.training.max_length))
    collator = None
    if levers.padding_free:
        collator = fast.PackedRowsCollator(
            pad_token_id=tokenizer.pad_token_id, capacity=max(spec.training.max_length, fast.PACK_ROW_TOKENS)
        )
    summary: dict = {}
    set_seed(spec.training.seed)  # LoRA init draws from the RNG: same seed, same adapter init
    trainer = SFTTrainer(
        model=model,
        args=sft_config(spec, dtype, job_dir / "checkpoints", levers),
        data_collator=collator,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=training.lora_config(spec.lora),
        callbacks=[make_callback(log, summary)],
    )
    modeling.cast_trainable(trainer.model, dtype, master_fp32=levers.master_fp32)
    effective = training.base_effective(dtype, spec.training, len(train_rows), levers)
    training.run_trainer(
        trainer, job_dir, log,
        dict(stage="sft", device=effective["device"], dtype=effective["compute_dtype"],
             total_steps=effective["total_steps"], rows=len(train_rows), levers=levers.effective()),
    )
    return training.finish(
        trainer, tokenizer, spec, job_dir, log, summary,
        resolved_base=base, data=data, lengths=lengths,
        stack_base=spec.base_model, stack_quant=spec.quant, stack_parents=[],
        effective=effective, has_eval=bool(eval_rows),
    )
