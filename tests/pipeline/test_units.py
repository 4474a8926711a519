"""Small parts on real objects: the fp16 cast of trainable weights, events.jsonl, checkpoint manifests."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.checkpoints import MANIFEST, is_complete, latest_complete, mark_complete
from tinyllama_mcp.pipeline.events import EventLog, read_events


# ---------------------------------------------------------------- fp16: trainable weights in fp32


@pytest.fixture(scope="module")
def fp16_peft_model(tiny_demo):
    """tiny-demo in fp16 with LoRA adapters kept in fp16, as TRL leaves them (it casts QLoRA adapters to bf16)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make():
        model = AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float16)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        return get_peft_model(model, config, autocast_adapter_dtype=False)

    return make


def trainable_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def scaled_step(model, tokenizer) -> float:
    """One fp16 step with a gradient scaler, as the Trainer takes it with fp16=True."""
    ids = torch.tensor([tokenizer("Run the full test suite on a clean clone.", add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # refuses fp16 gradients
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def test_fp16_training_needs_fp32_trainable_weights(fp16_peft_model, tokenizer):
    model = fp16_peft_model()
    assert trainable_dtypes(model) == {torch.float16}
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaled_step(model, tokenizer)


def test_cast_trainable_makes_fp16_training_work(fp16_peft_model, tokenizer):
    model = fp16_peft_model()
    frozen_before = {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    modeling.cast_trainable(model, torch.float16)
    assert trainable_dtypes(model) == {torch.float32}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the frozen base stays fp16 and untouched
            dtype, value = frozen_before[name]
            assert p.dtype == dtype == torch.float16 and torch.equal(p, value)
    assert math.isfinite(scaled_step(model, tokenizer))
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_cast_trainable_keeps_bf16_and_fp32(fp16_peft_model):
    model = fp16_peft_model()
    modeling.cast_trainable(model, torch.bfloat16)
    assert trainable_dtypes(model) == {torch.bfloat16}
    modeling.cast_trainable(model, torch.float32)
    assert trainable_dtypes(model) == {torch.float32}


def test_cast_trainable_on_an_nf4_model(tiny_demo):
    """QLoRA: the adapters on an NF4 base, which TRL casts to bf16, go to fp32 for fp16 compute."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline.specs import QuantSpec

    base = modeling.load_base(tiny_demo, QuantSpec(compute_dtype="fp16"), torch.float16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    modeling.cast_trainable(model, torch.float16)
    assert trainable_dtypes(model) == {torch.float32}
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_compute_dtype_on_cpu():
    assert modeling.compute_dtype("auto") is torch.float32
    assert modeling.compute_dtype("fp16") is torch.float16
    assert modeling.dtype_name(modeling.compute_dtype("bf16")) == "bf16"


# ---------------------------------------------------------------- events.jsonl


def test_events_are_json_lines_with_time(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("start", stage="sft", resume_step=None)
    log.emit("step", step=1, loss=float("nan"), grad_norm=float("inf"))
    log.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    start, step = (json.loads(line) for line in lines)  # strict JSON: NaN/inf became null
    assert start["event"] == "start" and isinstance(start["time"], float) and start["resume_step"] is None
    assert step["loss"] is None and step["grad_norm"] is None


def test_a_torn_last_line_does_not_swallow_the_next_run(tmp_path):
    """kill -9 mid-write leaves half a line; the rerun's `start` must still be readable."""
    path = tmp_path / "events.jsonl"
    first = EventLog(path)
    first.emit("step", step=3, loss=1.0)
    first.close()
    with open(path, "a") as f:
        f.write('{"event": "step", "step": 4, "lo')  # the process died here
    assert [e["step"] for e in read_events(path)] == [3]
    second = EventLog(path)
    second.emit("start", stage="sft", resume_step=3)
    second.close()
    events = read_events(path)
    assert [e["event"] for e in events] == ["step", "start"]
    assert events[-1]["resume_step"] == 3


def test_reopening_a_clean_log_adds_no_blank_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    for step in range(3):
        log = EventLog(path)
        log.emit("step", step=step)
        log.close()
    assert path.read_text().count("\n") == 3 and "\n\n" not in path.read_text()


# ---------------------------------------------------------------- checkpoint manifests


def fake_checkpoint(root, step: int):
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "sub" / "state.json").write_text(json.dumps({"global_step": step}))
    mark_complete(folder)
    return folder


def test_manifest_lists_every_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 5)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {"adapter_model.safetensors", "sub/state.json"}
    assert is_complete(folder)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest", "bad-manifest"])
def test_damaged_checkpoints_are_not_complete(tmp_path, damage):
    folder = fake_checkpoint(tmp_path, 5)
    weights = folder / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[7] ^= 1
        weights.write_bytes(bytes(data))  # same size, different content
    elif damage == "delete":
        weights.unlink()
    elif damage == "no-manifest":
        (folder / MANIFEST).unlink()
    else:
        (folder / MANIFEST).write_text("{not json")
    assert not is_complete(folder)


def test_latest_complete_skips_and_sets_aside_broken_ones(tmp_path):
    for step in (2, 4, 10, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-10" / MANIFEST).unlink()  # killed mid-save
    weights = tmp_path / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])  # truncated
    (tmp_path / "runs").mkdir()  # not a checkpoint
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-4"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["broken-checkpoint-10", "broken-checkpoint-6", "checkpoint-2", "checkpoint-4", "runs"]
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-4"  # stable on a second look


def test_the_same_step_breaking_twice(tmp_path):
    """A resumed run that dies again while saving the same step must not fail on the set-aside rename."""
    fake_checkpoint(tmp_path, 2)
    for attempt in range(3):
        folder = fake_checkpoint(tmp_path, 4)
        (folder / MANIFEST).unlink()
        assert latest_complete(tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("broken")) == [
        "broken-checkpoint-4", "broken-checkpoint-4-2", "broken-checkpoint-4-3"
    ]


def test_no_checkpoints(tmp_path):
    assert latest_complete(tmp_path / "missing") is None
    (tmp_path / "checkpoint-3").mkdir()
    assert latest_complete(tmp_path) is None
