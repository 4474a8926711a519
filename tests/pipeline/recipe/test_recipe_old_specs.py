"""A spec.json queued before the speed-ups had their own model (their fields beside the recipe's in `training`)
still loads and runs."""

from __future__ import annotations

import json

from tinyllama_mcp.pipeline.events import read_events
from tinyllama_mcp.pipeline.runner import EXIT_OK, run
from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import parse_stage_spec

# Written by the pipeline's SFTSpec(...).model_dump_json() before SpeedSpec (the dataset and sizes made small).
OLD_SPEC = {
    "base_model": "tiny-demo", "parents": [], "stage": "sft",
    "dataset": {"source": "SFT_SAMPLE", "split": "train", "shuffle_seed": None, "max_samples": 8, "sha256": None},
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "bias": "none",
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "quant": {"quantization": "nf4", "double_quant": True, "compute_dtype": "auto"},
    "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 0.0002,
                 "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "num_train_epochs": 1.0, "max_steps": 2,
                 "max_length": 128, "optim": "paged_adamw_32bit", "weight_decay": 0.0, "max_grad_norm": 1.0,
                 "gradient_checkpointing": "auto", "padding_free": False, "max_tokens_per_batch": 16384,
                 "fused_optimizer": True, "tokens_per_step": 0, "torch_compile": False, "cuda_graphs": "auto",
                 "sync_free_step": "auto", "dequantized_base": "auto", "use_liger_kernel": "auto", "fused_lora": True,
                 "varlen_attention": True, "activation_offloading": False, "precompute_ref_log_probs": "auto",
                 "dataloader_workers": "auto", "share_prompt": True, "seed": 42, "logging_steps": 1,
                 "save_steps": 50, "save_total_limit": 2, "eval_fraction": 0.0},
    "eval_prompts": {"prompts": [], "max_new_tokens": 8},
}


def old_spec_text() -> str:
    spec = json.loads(json.dumps(OLD_SPEC))
    spec["dataset"]["source"] = str(SFT_SAMPLE)
    return json.dumps(spec)


def test_an_old_spec_loads_with_its_speed_fields_in_place():
    spec = parse_stage_spec(old_spec_text())
    assert spec.training.speed.padding_free is False and spec.training.speed.torch_compile is False
    assert spec.training.speed.fused_lora is True and spec.training.max_steps == 2
    assert parse_stage_spec(spec.model_dump_json()) == spec  # and reads back in the new layout


def test_an_old_spec_runs(tmp_path, tiny_demo):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "spec.json").write_text(old_spec_text())
    assert run(job_dir) == EXIT_OK
    events = read_events(job_dir / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    assert start["levers"]["padding_free"] is False  # the old spec's choice, read from its old place
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2] and events[-1]["event"] == "end"
