"""Agreement with the reference library: on the same data and seed, the first steps' losses of our
SFT stage equal those of a plain TRL `SFTTrainer` built here, independently, with the same settings.
CPU, fp32, no quantization: deterministic, so the tolerance is tight.
"""

from __future__ import annotations

import json

import pytest
import torch

from tinyllama_mcp.pipeline.events import EventLog, read_events
from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS, TrainingSpec
from tinyllama_mcp.pipeline.speed.machine import Machine

from pipeline_testlib import sft_demo_spec

ROWS, STEPS, SEED = 16, 4, 1234
# Every speed lever off: the recipe as written, plain TRL.
LEVERS_OFF = {"padding_free": False, "max_tokens_per_batch": 0, "fused_optimizer": False, "torch_compile": False,
              "cuda_graphs": False, "sync_free_step": False, "dequantized_base": False, "use_liger_kernel": False,
              "fused_lora": False, "varlen_attention": False, "precompute_ref_log_probs": False,
              "dataloader_workers": 0, "share_prompt": False, "lean_steps": False}


def our_losses(tmp_path, levers: dict) -> list[float]:
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    training = {"max_steps": STEPS, "seed": SEED, "save_steps": 1000}
    training["speed"] = dict(levers, gradient_checkpointing=False)
    spec = sft_demo_spec(SFT_SAMPLE, max_samples=ROWS, training=training, quant={"quantization": "none"},
                         eval_prompts={"prompts": []})
    assert spec.quant.compute_dtype == "auto"  # fp32 on CPU
    log = EventLog(tmp_path / "events.jsonl")
    run_sft(spec, tmp_path, log)
    log.close()
    return [e["loss"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "step"]


def trl_losses(tmp_path, tiny_demo) -> list[float]:
    """A plain TRL run: the model from transformers, the rows from the file, the settings spelt out."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from tinyllama_mcp.pipeline.modeling import load_tokenizer

    rows = [json.loads(line) for line in SFT_SAMPLE.read_text("utf-8").splitlines()[:ROWS]]
    model = AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        max_steps=STEPS,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        logging_steps=1,
        max_length=128,
        packing=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                      target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
    set_seed(SEED)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(tiny_demo), peft_config=lora)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, tiny_demo) -> list[float]:
    losses = trl_losses(tmp_path_factory.mktemp("trl"), tiny_demo)
    assert len(losses) == STEPS
    return losses


def test_first_steps_match_trl(tmp_path, reference_losses):
    ours = our_losses(tmp_path, LEVERS_OFF)
    assert len(ours) == STEPS
    assert ours == pytest.approx(reference_losses, rel=1e-5)
    assert ours[-1] < ours[0]  # the steps train (the comparison is not of four copies of one number)


def test_first_steps_match_trl_with_the_default_speed_levers(tmp_path, reference_losses):
    """The levers on by default (packing without padding, fused micro-batches) learn the same per token."""
    ours = our_losses(tmp_path, {})
    assert ours == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("machine", [Machine(), Machine.gpu()], ids=["cpu", "gpu"])
def test_every_lever_off_plans_the_recipe_as_written(tiny_demo, stage, machine):
    """With every speed field off, the planner's plan is Plan.off(): the recipe's micro-batch, accumulation,
    optimizer, checkpointing and steps, and no lever, on any machine."""
    from transformers import AutoConfig

    from tinyllama_mcp.pipeline.speed.plan import Plan, decide

    t = TrainingSpec(speed=dict(LEVERS_OFF, gradient_checkpointing=True, tokens_per_step=0))
    plan = decide(t, stage, machine, AutoConfig.from_pretrained(tiny_demo), torch.float32, rows=100, mean_tokens=300)
    assert plan == Plan.off(t, machine)
