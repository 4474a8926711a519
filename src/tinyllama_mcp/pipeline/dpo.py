"""DPO stage: the SFT model + preference pairs -> a DPO LoRA adapter trained on top of it.

The SFT adapter is merged into the (dequantized) base in 16-bit, the result is quantized
again to NF4, and a fresh adapter is trained on it. With the adapter switched off that same
model is the reference, so the policy starts equal to the reference, as DPO assumes.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from tinyllama_mcp.pipeline import dpo_packing, dpo_reference, dpo_start_check, fast, modeling, training
from tinyllama_mcp.pipeline.chat import render
from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline.events import EventLog, make_callback
from tinyllama_mcp.pipeline.specs import DPOSpec, QuantSpec

POLICY_BASE = "sft_merged_base"  # under JOB_DIR/work: the SFT model DPO trains on
READY = "READY"
REFERENCE_BATCHES = 4  # the reference log-probs are precomputed in batches of this many micro-batches (no gradients)


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


def run_dpo(spec: DPOSpec, job_dir: Path, log: EventLog) -> dict:
    inputs = training.load_inputs(spec, "dpo", log)  # before importing TRL: bad data fails fast

    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    dtype, tokenizer, original_base = inputs.dtype, inputs.tokenizer, inputs.base
    pairs = to_text_pairs(inputs.data.rows, tokenizer, spec.training.max_length)
    train_rows, eval_rows = training.split_eval(pairs, spec.training.eval_fraction, spec.training.seed)

    if spec.sft_adapter:
        policy_base, sft_stack = sft_merged_base(spec, job_dir, dtype)
        stack_base, stack_quant, stack_parents = sft_stack["base_model"], QuantSpec(**sft_stack["quant"]), sft_stack["adapters"]
    else:
        policy_base = original_base
        stack_base, stack_quant, stack_parents = spec.base_model, spec.quant, []
    model = modeling.load_base(policy_base, spec.quant, dtype)
    levers = fast.resolve(spec.training, "dpo", model.config, dtype, rows=len(train_rows), mean_tokens=inputs.mean_tokens)

    summary: dict = {}
    set_seed(spec.training.seed)
    args = DPOConfig(
        **training.trainer_kwargs(spec.training, dtype, job_dir / "checkpoints", levers),
        beta=spec.beta,
        max_length=spec.training.max_length,
        truncation_mode="keep_start",
        eval_strategy="no",
        precompute_ref_log_probs=False,  # precomputed below (dpo_reference), once the levers are on the model
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # with a PEFT model the reference is the same model with the adapter off
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=training.lora_config(spec.lora),
        callbacks=[make_callback(log, summary), dpo_start_check.start_check_callback(spec.beta)],
    )
    training.prepare_model(trainer, dtype, levers)
    fast.quick_adapter_switch(trainer.model)  # the reference pass switches the adapter off every step
    effective = training.base_effective(dtype, spec.training, len(train_rows), levers)
    effective["policy_base"] = policy_base
    # TRL's DPO padding-free is disabled upstream. Packed batches with varlen attention compute no padding;
    # else right-padded batches at least need no attention mask under causal attention.
    unmask = None
    if levers.padding_free and levers.varlen_attention:
        trainer.data_collator = dpo_packing.PackedPairsCollator(trainer.data_collator, levers.width_multiple,
                                                                levers.share_prompt, spec.training.max_length)
        padding = dpo_packing.packing(trainer.model)
    else:
        padding = contextlib.nullcontext()
        unmask = fast.drop_right_padding_mask(trainer.model) if levers.padding_free else None
    try:
        # Training and the eval loss (their batches are the collator's): generation (eval samples) pads and
        # caches, and keeps its masks.
        with padding:
            fields = training.start_fields("dpo", effective, len(train_rows), levers)
            if levers.precompute_ref_log_probs:  # its rows and seconds: part of the run's cost
                fields["reference_logps"] = effective["reference_logps"] = dpo_reference.precompute(
                    trainer, levers.batch_size * REFERENCE_BATCHES, levers.dataloader_workers)
            training.run_trainer(trainer, job_dir, log, fields)
    finally:
        if unmask is not None:
            unmask.remove()
    summary = training.finish(
        trainer, tokenizer, spec, job_dir, log, summary,
        resolved_base=original_base, data=inputs.data, lengths=inputs.lengths,
        stack_base=stack_base, stack_quant=stack_quant, stack_parents=stack_parents,
        effective=effective,
        stack_policy_quant=spec.quant if spec.sft_adapter else None,  # serving redoes the NF4 round trip
    )
    shutil.rmtree(job_dir / "work", ignore_errors=True)  # the merged SFT base is large and rebuilt on demand
    return summary
