"""SFT stage: base model + chat data -> LoRA adapter (QLoRA on an NF4 base by default), as the recipe writes it.

Load the inputs, load the base, plan the speed-ups, build the trainer, train, finish. Each speed-up is one named
call into speed.apply; with every lever off (Plan.off()) this is the recipe exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.events import EventLog, make_callback
from tinyllama_mcp.pipeline.recipe import common, validation
from tinyllama_mcp.pipeline.specs import SFTSpec


def run_sft(spec: SFTSpec, job_dir: Path, log: EventLog, *, callbacks: Sequence = (),
            overrides: Optional[dict[str, Any]] = None) -> dict:
    """Train the SFT adapter into JOB_DIR; returns the end summary. `callbacks`: more TrainerCallbacks; `overrides`:
    Plan fields set after planning (the bench's switches)."""
    inputs = common.load_inputs(spec, "sft", log)  # before importing TRL: bad data fails fast

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig

    from tinyllama_mcp.pipeline.recipe.trainers import SFTTrainer
    from tinyllama_mcp.pipeline.speed import apply as speed

    t, dtype, tokenizer = spec.training, inputs.dtype, inputs.tokenizer
    train_rows, held = validation.held_out(spec, "sft", inputs.data.rows)  # checked before any model loads
    model = modeling.load_base(inputs.base, spec.quant, dtype)
    plan = speed.plan_for(t, "sft", model, dtype, rows=len(train_rows), mean_tokens=inputs.mean_tokens,
                          row_lengths=inputs.row_lengths, overrides=overrides)

    summary: dict = {}
    set_seed(t.seed)  # LoRA init draws from the RNG: same seed, same adapter init
    trainer = SFTTrainer(
        plan=plan,
        model=model,
        args=SFTConfig(**common.trainer_kwargs(t, dtype, job_dir / "checkpoints", plan), max_length=t.max_length,
                       packing=False, eval_strategy="no"),
        data_collator=speed.sft_collator(plan, tokenizer.pad_token_id, t.max_length),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held.rows) if held else None,
        processing_class=tokenizer,
        peft_config=common.lora_config(spec.lora),
        callbacks=[make_callback(log, summary), *callbacks],
    )
    validation.attach(trainer, held, log)
    speed.prepare_model(trainer, plan, dtype)
    effective = common.base_effective(dtype, t, len(train_rows), plan)
    with speed.training_attention(plan, trainer.model, "sft"):
        valid = common.run_trainer(trainer, job_dir, log, common.start_fields("sft", effective, len(train_rows), plan))
    return common.finish(
        trainer, tokenizer, spec, job_dir, log, summary,
        resolved_base=inputs.base, data=inputs.data, lengths=inputs.lengths,
        stack_base=spec.base_model, stack_quant=spec.quant, stack_parents=[],
        effective=effective, validation=valid,
    )
