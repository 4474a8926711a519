"""The stages with speed levers on learn the same as with them off: the same losses and gradient norms.

Each lever, where it runs on a CPU, is checked end to end: the stage runs in-process on the embedded tiny-demo model
in fp32 with LoRA dropout 0 (dropout draws would differ with the batch layout), for two optimizer steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from tinyllama_mcp.pipeline.specs import SFTSpec, TrainingSpec

from speed_testlib import OFF, ON, dpo_spec, run_stage, sft_spec, start_event

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_dataloader_workers_learn_the_same(tmp_path, demo_config, stage):
    """dataloader_workers: batches collated in worker processes train exactly what the training process collates
    (DPO: its precomputed reference pass collated in workers too)."""
    from tinyllama_mcp.pipeline.recipe.dpo import run_dpo
    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.speed.machine import Machine
    from tinyllama_mcp.pipeline.speed.plan import decide

    run, spec = (run_sft, sft_spec) if stage == "sft" else (run_dpo, dpo_spec)
    levers = dict(ON, **({"precompute_ref_log_probs": True} if stage == "dpo" else {}))
    _, inline = run_stage(run, spec(dict(levers, dataloader_workers=0)), tmp_path / "inline")
    _, workers = run_stage(run, spec(dict(levers, dataloader_workers=2)), tmp_path / "workers")
    start = start_event(tmp_path / "workers")
    assert start["levers"]["dataloader_workers"] == 2
    assert stage == "sft" or start["reference_logps"]["rows"] == 16
    assert [(s["loss"], s["grad_norm"]) for s in workers] == [(s["loss"], s["grad_norm"]) for s in inline]

    assert TrainingSpec().speed.dataloader_workers == "auto" and decide(
        TrainingSpec(), stage, Machine(), demo_config, torch.float32, rows=10).dataloader_workers == 0
    with pytest.raises(ValueError, match="dataloader_workers"):
        TrainingSpec(dataloader_workers=17)


def test_dpo_validation_does_not_depend_on_the_levers(tmp_path):
    """eval_fraction: the held-out pairs are scored where training runs, on the collator's batches (with the levers
    on: packed pairs, shared prompts, the held-out pairs' precomputed reference log-probs), at each checkpoint and at
    the end, with the figures of the levers off (SFT's: tests/pipeline/recipe/test_recipe_validation.py)."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.recipe.dpo import run_dpo

    runs = {}
    for name, levers in (("off", OFF), ("on", dict(ON, precompute_ref_log_probs=True))):
        spec = dpo_spec(dict(levers, eval_fraction=0.25))
        spec.training.save_steps = 1
        run_stage(run_dpo, spec, tmp_path / name)
        runs[name] = read_events(tmp_path / name / "events.jsonl")
    start = next(e for e in runs["on"] if e["event"] == "start")
    assert start["levers"]["varlen_attention"] and start["levers"]["share_prompt"] and start["rows"] == 12
    assert start["reference_logps"]["rows"] == 16  # the training and the held-out pairs
    off, on = ([e for e in events if e["event"] == "validation"] for events in (runs["off"], runs["on"]))
    assert [e["step"] for e in on] == [1, 2, 2] == [e["step"] for e in off]  # two checkpoints, then the full set
    assert on[-1]["full_valid_rows"] == 4 and on[0]["valid_rows"] == 4
    for a, b in zip(off, on):
        figures = [k for k in a if k.startswith(("valid_", "full_valid_")) and not k.endswith("_rows")]
        assert len(figures) == 3
        for key in figures:
            assert math.isfinite(a[key]) and math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a, b)
        assert a["best_checkpoint"]["step"] == b["best_checkpoint"]["step"]
    assert 0 <= on[-1]["full_valid_reward_accuracy"] <= 1 and on[-1]["full_valid_loss"] > 0
    kinds = [e["event"] for e in runs["on"]]
    assert kinds.index("validation") < kinds.index("artifact")  # before the adapter is saved


def test_sft_levers_learn_the_same(tmp_path):
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    off_summary, off = run_stage(run_sft, sft_spec(OFF), tmp_path / "off")
    on_summary, on = run_stage(run_sft, sft_spec(ON), tmp_path / "on")
    start = start_event(tmp_path / "on")
    assert start["levers"]["padding_free"] and start["levers"]["micro_batch_size"] == 8
    assert start["levers"]["varlen_attention"] and start["levers"]["fused_lora"]
    assert [s["step"] for s in on] == [1, 2] == [s["step"] for s in off]
    for a, b in zip(off, on):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
    assert on_summary["tokens_seen"] == off_summary["tokens_seen"]  # real tokens, pads not counted


def test_dpo_levers_learn_the_same(tmp_path, monkeypatch):
    from tinyllama_mcp.pipeline.recipe.dpo import run_dpo
    from tinyllama_mcp.pipeline.speed import compiled_layers

    spec = dpo_spec
    _, off = run_stage(run_dpo, spec(OFF), tmp_path / "off")
    _, on = run_stage(run_dpo, spec(ON), tmp_path / "on")
    pre = dict(ON, precompute_ref_log_probs=True)
    _, precomputed = run_stage(run_dpo, spec(pre), tmp_path / "pre")
    # The compiled layers for the policy and for the reference pass (the adapter off), traced with aot_eager here
    # (the same graphs inductor compiles; test_sft_torch_compile_learns_the_same runs inductor's kernels).
    calls = []
    compiled_fn = compiled_layers._compiled
    monkeypatch.setattr(compiled_layers, "_compiled",
                        lambda *key: lambda *args: calls.append(torch.is_grad_enabled()) or compiled_fn(*key)(*args))
    aot_eager = {"compile_backend": "aot_eager"}
    _, compiled = run_stage(run_dpo, spec(dict(ON, torch_compile=True)), tmp_path / "compiled", overrides=aot_eager)
    assert calls.count(True) == calls.count(False) == 2 * 2  # steps x layers (one fused micro-batch), each pass
    # Precomputed through the compiled reference pass: no reference forward in the steps, one per batch before.
    calls.clear()
    _, compiled_pre = run_stage(run_dpo, spec(dict(pre, torch_compile=True)), tmp_path / "compiled_pre",
                                overrides=aot_eager)
    start = start_event(tmp_path / "compiled_pre")
    batches = -(-start["rows"] // (4 * start["levers"]["micro_batch_size"]))
    assert start["reference_logps"]["rows"] >= start["rows"] and start["reference_logps"]["seconds"] > 0
    assert calls.count(True) == 2 * 2 and calls.count(False) >= batches * 2
    assert calls[: calls.count(False)] == [False] * calls.count(False)  # all before the first step
    start = start_event(tmp_path / "on")
    assert start["levers"]["varlen_attention"] and start["levers"]["fused_lora"]  # packed pairs, fused LoRA
    assert "reference_logps" not in start
    for a, b, c, d, e in zip(off, on, precomputed, compiled, compiled_pre):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["loss"], c["loss"], rel_tol=1e-4), (a, c)
        assert math.isclose(a["loss"], d["loss"], rel_tol=1e-4), (a, d)
        assert math.isclose(a["loss"], e["loss"], rel_tol=1e-4), (a, e)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
        assert math.isclose(a["grad_norm"], d["grad_norm"], rel_tol=1e-3), (a, d)
        assert math.isclose(a["grad_norm"], e["grad_norm"], rel_tol=1e-3), (a, e)
    assert len(on) == len(off) == len(compiled) == len(compiled_pre) == 2


def test_sft_fused_optimizer_learns_the_same(tmp_path):
    """The Trainer path with adamw_torch_fused (forced here; on CUDA the lever picks it) vs adamw_torch."""
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    _, off = run_stage(run_sft, sft_spec(dict(OFF, padding_free=True)), tmp_path / "off")
    fused = {"optim": "adamw_torch_fused", "master_fp32": True}  # what the plan picks on CUDA
    _, on = run_stage(run_sft, sft_spec(dict(OFF, padding_free=True, fused_optimizer=True)), tmp_path / "on",
                      overrides=fused)
    start = start_event(tmp_path / "on")
    assert start["levers"]["optim"] == "adamw_torch_fused" and start["levers"]["master_weights_fp32"]
    assert len(on) == len(off) == 2
    for a, b in zip(off, on):  # step 2's loss is after one optimizer update
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)


def test_sft_token_budget_step_equals_the_bigger_recipe_step(tmp_path):
    """tokens_per_step = k x the recipe's sequences a step and max_steps / k: the same as asking for that step."""
    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    def spec(training: dict) -> SFTSpec:
        base = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_length=128,
                    learning_rate=1e-2, warmup_ratio=0.25, save_steps=100, **OFF)
        return SFTSpec(
            base_model="tiny-demo", dataset={"source": str(SFT_SAMPLE), "max_samples": 32},
            lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
            training={**base, **training}, eval_prompts={"prompts": [], "max_new_tokens": 1},
        )

    # 32 rows cap k at 4: 32 sequences a step; max_steps 8 recipe steps -> 2 optimizer steps.
    _, budget = run_stage(run_sft, spec(dict(tokens_per_step=1_000_000, max_tokens_per_batch=16384, max_steps=8)),
                          tmp_path / "budget")
    _, manual = run_stage(run_sft, spec(dict(gradient_accumulation_steps=16, max_steps=2)), tmp_path / "manual")
    start = start_event(tmp_path / "budget")
    lv = start["levers"]
    assert (lv["step_scale"], lv["sequences_per_step"], lv["max_steps"]) == (4, 32, 2)
    assert start["total_steps"] == 2 and [s["total"] for s in budget] == [2, 2]
    assert [s["step"] for s in budget] == [1, 2] == [s["step"] for s in manual]
    for a, b in zip(manual, budget):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
        assert math.isclose(a["learning_rate"], b["learning_rate"], rel_tol=1e-6), (a, b)


@pytest.mark.slow
def test_sft_torch_compile_learns_the_same(tmp_path):
    """The stage with torch_compile on (inductor's kernels, here its CPU ones): the eager stage's losses."""
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    packed = dict(OFF, padding_free=True, varlen_attention=True, fused_lora=True)
    _, off = run_stage(run_sft, sft_spec(packed), tmp_path / "off")
    _, on = run_stage(run_sft, sft_spec(dict(packed, torch_compile=True)), tmp_path / "on")
    start = start_event(tmp_path / "on")
    assert start["levers"]["torch_compile"] is True
    assert len(on) == len(off) == 2
    for a, b in zip(off, on):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)


def test_sync_free_step_learns_the_same(tmp_path):
    """sync_free_step: the chunked loss over positions listed on the CPU trains what TRL's loss trains: the same
    losses, gradients and real-token counts (packed batches, padded widths included)."""
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    trl_summary, trl = run_stage(run_sft, sft_spec(dict(ON, sync_free_step=False)), tmp_path / "trl")
    own_summary, own = run_stage(run_sft, sft_spec(dict(ON, sync_free_step=True)), tmp_path / "own")
    start = start_event(tmp_path / "own")
    assert start["levers"]["sync_free_step"] and start["levers"]["padding_free"]
    assert [s["step"] for s in own] == [1, 2]
    for a, b in zip(trl, own):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
    assert own_summary["tokens_seen"] == trl_summary["tokens_seen"]
