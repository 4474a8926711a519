"""SFT stage: base model + chat data -> LoRA adapter (QLoRA on an NF4 base by default)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tinyllama_mcp.pipeline import fast, modeling, sft_loss, training, varlen_attention
from tinyllama_mcp.pipeline.events import EventLog, make_callback
from tinyllama_mcp.pipeline.specs import SFTSpec


def sft_config(spec: SFTSpec, dtype, output_dir: Path, levers=None):
    from trl import SFTConfig

    return SFTConfig(
        **training.trainer_kwargs(spec.training, dtype, output_dir, levers),
        max_length=spec.training.max_length,
        packing=False,
        eval_strategy="no",
    )


def run_sft(spec: SFTSpec, job_dir: Path, log: EventLog) -> dict:
    inputs = training.load_inputs(spec, "sft", log)  # before importing TRL: bad data fails fast

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    dtype, tokenizer = inputs.dtype, inputs.tokenizer
    train_rows, eval_rows = training.split_eval(inputs.data.rows, spec.training.eval_fraction, spec.training.seed)

    model = modeling.load_base(inputs.base, spec.quant, dtype)
    levers = fast.resolve(spec.training, "sft", model.config, dtype, rows=len(train_rows), mean_tokens=inputs.mean_tokens,
                          row_lengths=inputs.row_lengths)
    why_not = sft_loss.unsupported(model) if levers.sync_free_step else None
    if why_not:  # decided before the Trainer's settings, which follow from it
        levers.sync_free_step = False
        levers.notes.append(f"sync_free_step skipped: {why_not}")
    collator = None
    if levers.padding_free:
        # varlen attention costs each sequence only its own length: the whole micro-batch goes in one row
        capacity = max(spec.training.max_length, fast.PACK_ROW_TOKENS)
        if levers.varlen_attention:
            capacity = levers.batch_size * spec.training.max_length
        collator = fast.PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, capacity=capacity,
                                           cu_seq_lens=levers.varlen_attention, width_multiple=levers.width_multiple,
                                           loss_positions=levers.sync_free_step,
                                           max_sequence=spec.training.max_length)
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
    training.prepare_model(trainer, dtype, levers)
    if levers.sync_free_step:
        sft_loss.install(trainer, compiled=levers.torch_compile)
    effective = training.base_effective(dtype, spec.training, len(train_rows), levers)
    attention = varlen_attention.use(trainer.model) if levers.varlen_attention else contextlib.nullcontext()
    with attention:  # training and the eval loss only: generation afterwards keeps sdpa and its masks
        training.run_trainer(trainer, job_dir, log, training.start_fields("sft", effective, len(train_rows), levers))
    return training.finish(
        trainer, tokenizer, spec, job_dir, log, summary,
        resolved_base=inputs.base, data=inputs.data, lengths=inputs.lengths,
        stack_base=spec.base_model, stack_quant=spec.quant, stack_parents=[],
        effective=effective,
    )
