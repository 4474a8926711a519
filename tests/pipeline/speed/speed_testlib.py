"""Helpers of the speed-lever tests: the lever sets, the stage specs and runs, and sample rows.

The stage runs use the embedded tiny-demo model in fp32 with LoRA dropout 0 (dropout draws would differ with the
batch layout), each stage in-process for two optimizer steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tinyllama_mcp.pipeline.specs import DPOSpec, SFTSpec, SpeedSpec, TrainingSpec

# The speed levers all off (the recipe as written), and all on.
OFF = dict(padding_free=False, max_tokens_per_batch=0, gradient_checkpointing=True, use_liger_kernel=False,
           precompute_ref_log_probs=False, fused_optimizer=False, tokens_per_step=0, dequantized_base=False,
           fused_lora=False, varlen_attention=False)
ON = dict(padding_free=True, max_tokens_per_batch=16384, gradient_checkpointing="auto", use_liger_kernel=True,
          precompute_ref_log_probs="auto", fused_optimizer=True, tokens_per_step="auto", dequantized_base="auto",
          fused_lora=True, varlen_attention=True)


def with_speed(t: TrainingSpec, **fields: Any) -> TrainingSpec:
    """`t` with these SpeedSpec fields changed (validated; model_copy alone would not reach t.speed)."""
    return t.model_copy(update={"speed": SpeedSpec(**{**t.speed.model_dump(), **fields})})


def steps(job_dir: Path) -> list[dict]:
    from tinyllama_mcp.pipeline.events import read_events

    return [e for e in read_events(job_dir / "events.jsonl") if e["event"] == "step"]


def start_event(job_dir: Path) -> dict:
    from tinyllama_mcp.pipeline.events import read_events

    return next(e for e in read_events(job_dir / "events.jsonl") if e["event"] == "start")


def run_stage(stage_fn, spec, job_dir: Path, overrides: Optional[dict[str, Any]] = None):
    """Run a stage in-process into job_dir; `overrides`: Plan fields set after planning. (summary, step events)"""
    from tinyllama_mcp.pipeline.events import EventLog

    job_dir.mkdir(parents=True)
    log = EventLog(job_dir / "events.jsonl")
    try:
        summary = stage_fn(spec, job_dir, log, overrides=overrides)
    finally:
        log.close()
    return summary, steps(job_dir)


def sft_spec(levers: dict, base_model: str = "tiny-demo") -> SFTSpec:
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    return SFTSpec(
        base_model=base_model, dataset={"source": str(SFT_SAMPLE), "max_samples": 16},
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
        training=dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2, max_length=128,
                      learning_rate=1e-2, save_steps=100, **levers),
        eval_prompts={"prompts": [], "max_new_tokens": 1},
    )


def dpo_spec(levers: dict) -> DPOSpec:
    from tinyllama_mcp.pipeline.samples import DPO_SAMPLE

    return DPOSpec(
        base_model="tiny-demo", dataset={"source": str(DPO_SAMPLE), "max_samples": 16},
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
        training=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, max_length=128,
                      learning_rate=5e-3, warmup_ratio=0.0, save_steps=100, **levers),
        eval_prompts={"prompts": [], "max_new_tokens": 1},
    )


def sft_examples(tokenizer, n: int) -> list[dict]:
    """The first n rows of the SFT sample, rendered and tokenized (at most 200 tokens each)."""
    from tinyllama_mcp.pipeline.chat import render
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    rows = [json.loads(line) for line in SFT_SAMPLE.read_text().splitlines()[:n]]
    texts = [render(r["messages"], add_generation_prompt=False, eos=tokenizer.eos_token) for r in rows]
    return [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"][:200]} for t in texts]
