"""DPO stage: the SFT model + preference pairs -> a DPO LoRA adapter trained on top of it, as the recipe writes it.

The SFT adapter is merged into the (dequantized) base in 16-bit, the result is quantized again to NF4, and a fresh
adapter is trained on it. With the adapter switched off that same model is the reference, so the policy starts
equal to the reference, as DPO assumes, and the first step checks that it does (dpo_start_check). Each speed-up is
one named call into speed.apply; with every lever off (Plan.off()) this is the recipe exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.chat import render
from tinyllama_mcp.pipeline.events import EventLog, make_callback
from tinyllama_mcp.pipeline.recipe import common, dpo_start_check, validation
from tinyllama_mcp.pipeline.specs import DPOSpec, QuantSpec

POLICY_BASE = "sft_merged_base"  # under JOB_DIR/work: the SFT model DPO trains on
READY = "READY"


def sft_merged_base(spec: DPOSpec, job_dir: Path, dtype) -> tuple[str, dict]:
    """Save base + SFT adapter merged in 16-bit once per job (reused when the job resumes)."""
    stack = modeling.read_stack(spec.sft_adapter)
    folder = job_dir / "work" / POLICY_BASE
    if not (folder / READY).exists():
        shutil.rmtree(folder, ignore_errors=True)
        quant = QuantSpec(**stack["quant"])
        base = modeling.resolve_model(stack["base_model"])
        model = modeling.merge_adapters(modeling.load_dequantized(base, quant, dtype), stack["adapters"])
        model.save_pretrained(str(folder))
        modeling.load_tokenizer(base).save_pretrained(str(folder))
        write_atomic(folder / READY, "")
        del model
    return str(folder), stack


def truncate_prompt_left(tokenizer, prompt: str, budget: int) -> str:
    """Keep the last `budget` tokens of the prompt, cut at a token's character offset."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if len(offsets) <= budget:
        return prompt
    return prompt[offsets[len(offsets) - budget][0] :]


def to_text_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Rows as templated text. The prompt is cut from the left so prompt + longer answer fits max_length.

    DPO in TRL 1.x only truncates the end of a sequence, which would cut the answers; the recipe
    keeps the answers and the end of the prompt instead.
    """
    eos = tokenizer.eos_token
    out = []
    for row in rows:
        prompt = render(row["prompt_messages"], add_generation_prompt=True, eos=eos)
        chosen, rejected = row["chosen"] + eos, row["rejected"] + eos
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (chosen, rejected))
        budget = max(max_length - longest, max_length // 2)
        out.append({"prompt": truncate_prompt_left(tokenizer, prompt, budget), "chosen": chosen, "rejected": rejected})
    return out


def run_dpo(spec: DPOSpec, job_dir: Path, log: EventLog, *, callbacks: Sequence = (),
            overrides: Optional[dict[str, Any]] = None) -> dict:
    """Train the DPO adapter into JOB_DIR; returns the end summary. `callbacks`: more TrainerCallbacks; `overrides`:
    Plan fields set after planning (the bench's switches)."""
    inputs = common.load_inputs(spec, "dpo", log)  # before importing TRL: bad data fails fast

    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    from tinyllama_mcp.pipeline.recipe.trainers import DPOTrainer
    from tinyllama_mcp.pipeline.speed import apply as speed

    t, dtype, tokenizer, original_base = spec.training, inputs.dtype, inputs.tokenizer, inputs.base
    pairs = to_text_pairs(inputs.data.rows, tokenizer, t.max_length)
    train_rows, held = validation.held_out(spec, "dpo", pairs,
                                           lambda rows: to_text_pairs(rows, tokenizer, t.max_length))
    if spec.sft_adapter:
        policy_base, sft_stack = sft_merged_base(spec, job_dir, dtype)
        stack_base, stack_quant, stack_parents = sft_stack["base_model"], QuantSpec(**sft_stack["quant"]), sft_stack["adapters"]
    else:
        policy_base = original_base
        stack_base, stack_quant, stack_parents = spec.base_model, spec.quant, []
    model = modeling.load_base(policy_base, spec.quant, dtype)
    plan = speed.plan_for(t, "dpo", model, dtype, rows=len(train_rows), mean_tokens=inputs.mean_tokens,
                          overrides=overrides)

    summary: dict = {}
    set_seed(t.seed)
    trainer = DPOTrainer(
        plan=plan,
        model=model,
        ref_model=None,  # with a PEFT model the reference is the same model with the adapter off
        args=DPOConfig(**common.trainer_kwargs(t, dtype, job_dir / "checkpoints", plan), beta=spec.beta,
                       max_length=t.max_length, truncation_mode="keep_start", eval_strategy="no",
                       precompute_ref_log_probs=False),  # precomputed below, once the levers are on the model
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held.rows) if held else None,
        processing_class=tokenizer,
        peft_config=common.lora_config(spec.lora),
        callbacks=[make_callback(log, summary), dpo_start_check.start_check_callback(spec.beta), *callbacks],
    )
    trainer.data_collator = speed.dpo_collator(plan, trainer.data_collator, t.max_length)
    validation.attach(trainer, held, log)
    speed.prepare_model(trainer, plan, dtype)
    effective = common.base_effective(dtype, t, len(train_rows), plan)
    effective["policy_base"] = policy_base
    # Training and validation (their batches are the collator's); generation (eval samples) pads, caches and keeps
    # its masks.
    with speed.training_attention(plan, trainer.model, "dpo"):
        fields = common.start_fields("dpo", effective, len(train_rows), plan)
        reference = speed.precompute_reference(trainer, plan)  # its rows and seconds: part of the run's cost
        if reference is not None:
            fields["reference_logps"] = effective["reference_logps"] = reference
        valid = common.run_trainer(trainer, job_dir, log, fields)
    summary = common.finish(
        trainer, tokenizer, spec, job_dir, log, summary,
        resolved_base=original_base, data=inputs.data, lengths=inputs.lengths,
        stack_base=stack_base, stack_quant=stack_quant, stack_parents=stack_parents,
        effective=effective, validation=valid,
        stack_policy_quant=spec.quant if spec.sft_adapter else None,  # serving redoes the NF4 round trip
    )
    shutil.rmtree(job_dir / "work", ignore_errors=True)  # the merged SFT base is large and rebuilt on demand
    return summary
