"""Validation during training through the job command: valid_* figures at every checkpoint on a fixed sample, the
full_valid_* figures at the end, the best checkpoint, in events.jsonl, the summary and lineage.json; the figures
equal an independent computation with transformers; bad validation input is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.events import read_events
from tinyllama_mcp.pipeline.recipe import validation
from tinyllama_mcp.pipeline.runner import EXIT_OK, EXIT_USER, run
from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import DatasetSpec, DPOSpec, SFTSpec

from pipeline_testlib import write_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
VALIDATION = {"source": str(SFT_SAMPLE), "shuffle_seed": 7, "max_samples": 16}  # rows the training mostly did not see
SAMPLE_ROWS = 4  # the checkpoint sample, smaller than the 16 validation rows


def sft_spec(**fields) -> SFTSpec:
    """tiny-demo in fp32, no dropout, 2 steps with a checkpoint each; the levers on (the sync-free step too)."""
    return SFTSpec(
        base_model="tiny-demo", dataset={"source": str(SFT_SAMPLE), "max_samples": 16},
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
        training=dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2, max_length=128,
                      learning_rate=1e-2, save_steps=1, save_total_limit=1, sync_free_step=True),
        eval_prompts={"prompts": [], "max_new_tokens": 1}, **fields,
    )


def independent_figures(base: str, adapter: str, rows: list[dict], max_length: int) -> tuple[float, float]:
    """Token-mean loss and top-1 accuracy of base + adapter on the rows, with plain transformers and peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    nll = correct = tokens = 0.0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"][:max_length]
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        tokens += len(targets)
    return nll / tokens, correct / tokens


def test_sft_validation_at_checkpoints_and_at_the_end(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.setattr(validation, "VALID_SAMPLE_ROWS", SAMPLE_ROWS)
    job_dir = write_spec(tmp_path / "job", sft_spec(validation_dataset=VALIDATION))
    assert run(job_dir) == EXIT_OK
    events = read_events(job_dir / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    assert start["levers"]["varlen_attention"] and start["levers"]["sync_free_step"]  # the packed, sync-free path
    figures = [e for e in events if e["event"] == "validation"]
    at_checkpoints, final = figures[:-1], figures[-1]
    assert [e["step"] for e in at_checkpoints] == [1, 2]
    for e in at_checkpoints:
        assert e["valid_rows"] == SAMPLE_ROWS and e["checkpoint"].endswith(f"checkpoint-{e['step']}")
        assert e["valid_loss"] > 0 and 0 <= e["valid_mean_token_accuracy"] <= 1
    losses = {e["step"]: e["valid_loss"] for e in at_checkpoints}
    best_step = min(losses, key=losses.get)
    assert final["full_valid_rows"] == 16 and final["best_checkpoint"]["step"] == best_step
    assert final["best_checkpoint"]["valid_loss"] == losses[best_step]
    best = final["best_checkpoint"]["path"]
    assert (tmp_path / "job" / "checkpoints" / f"checkpoint-{best_step}").is_dir() and best.endswith(str(best_step))
    kinds = [e["event"] for e in events]
    assert kinds.index("checkpoint") < kinds.index("validation") and kinds.index("validation") < kinds.index("artifact")

    # The full set's figures are those of the saved adapter on the 16 rows, computed with transformers alone.
    from tinyllama_mcp.pipeline import data

    rows = data.load(DatasetSpec(**VALIDATION), "sft").rows
    loss, accuracy = independent_figures(tiny_demo, str(job_dir / "adapter"), rows, 128)
    assert abs(final["full_valid_loss"] - loss) < 1e-4, (final, loss)
    assert abs(final["full_valid_mean_token_accuracy"] - accuracy) < 1e-6

    summary = next(e for e in events if e["event"] == "end")["summary"]
    assert summary["full_valid_loss"] == final["full_valid_loss"] and summary["best_checkpoint"]["step"] == best_step
    lineage = json.loads((job_dir / "lineage.json").read_text())["validation"]
    assert lineage["from"] == "validation_dataset" and lineage["rows"] == 16 and lineage["sample_rows"] == SAMPLE_ROWS
    assert lineage["sha256"] and [c["step"] for c in lineage["checkpoints"]] == [1, 2]
    assert lineage["full"]["full_valid_loss"] == final["full_valid_loss"]
    assert lineage["best_checkpoint"] == final["best_checkpoint"]


def test_the_best_checkpoint_follows_the_stage_rule(tmp_path):
    history = [{"loss": 3.0, "step": 1}, {"valid_loss": 2.0, "valid_reward_accuracy": 0.5, "valid_reward_margin": 0.1,
                                          "step": 2},
               {"valid_loss": 1.5, "valid_reward_accuracy": 0.75, "valid_reward_margin": 0.2, "step": 4},
               {"valid_loss": float("nan"), "valid_reward_accuracy": 0.75, "valid_reward_margin": 0.3, "step": 6},
               {"full_valid_loss": 0.1, "step": 6}]
    sft = validation.best_checkpoint(history, "sft", tmp_path)
    assert sft["step"] == 4 and sft["path"] == str(tmp_path / "checkpoint-4")  # NaN never wins
    dpo = validation.best_checkpoint(history, "dpo", tmp_path)
    assert dpo["step"] == 6  # equal accuracy: the larger margin
    assert validation.best_checkpoint(history[:1], "sft", tmp_path) is None


def test_bad_validation_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="validation_dataset or training.eval_fraction, not both"):
        SFTSpec(validation_dataset={"source": str(SFT_SAMPLE)}, training={"eval_fraction": 0.1})
    spec = DPOSpec(base_model="tiny-demo", dataset={"source": str(DPO_SAMPLE), "max_samples": 3},
                   training={"eval_fraction": 0.25})
    with pytest.raises(UserError, match="eval_fraction 0.25 holds out no rows: the data has 3 row"):
        validation.held_out(spec, "dpo", [{}] * 3)
    assert validation.held_out(spec.model_copy(update={"training": spec.training.model_copy(
        update={"eval_fraction": 0.0})}), "dpo", [{}] * 3) == ([{}] * 3, None)
    # A validation file with bad rows fails the job before any model loads (exit 2, the row named).
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no messages here"}) + "\n")
    job_dir = write_spec(tmp_path / "job", sft_spec(validation_dataset={"source": str(bad)}))
    assert run(job_dir) == EXIT_USER
    error = [e for e in read_events(job_dir / "events.jsonl") if e["event"] == "error"][0]["message"]
    assert str(bad) in error and "row 1: missing column 'messages'" in error
    assert not (job_dir / "checkpoints").exists()  # stopped before training
