"""Agreement with the reference library: on the same data and seed, the first steps' losses of our
SFT stage equal those of a plain TRL `SFTTrainer` built here, independently, with the same settings.
CPU, fp32, no quantization: deterministic, so the tolerance is tight.
"""

from __future__ import annotations

import json

import pytest

from tinyllama_mcp.pipeline.events import EventLog, read_events
from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS, TrainingSpec

from pipeline_testlib import sft_demo_spec

ROWS, STEPS, SEED = 16, 4, 1234
# Speed levers (issue 4) that change how a batch is computed but not what is learned; "off" is plain TRL.
LEVERS_OFF = {"padding_free": False, "max_tokens_per_batch": 0}


def our_losses(tmp_path, levers: dict) -> list[float]:
    from tinyllama_mcp.pipeline.sft import run_sft

    training = {"max_steps": STEPS, "seed": SEED, "save_steps": 1000, "gradient_checkpointing": False}
    training.update({k: v for k, v in levers.items() if k in TrainingSpec.model_fields})
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
