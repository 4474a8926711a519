"""speed.plan's step shape: micro-batches fused within the token budget, token-budget steps, and the optimizer."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.speed.machine import Machine
from tinyllama_mcp.pipeline.speed.plan import decide
from tinyllama_mcp.pipeline.specs import TrainingSpec

from speed_testlib import with_speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CPU = Machine()


def test_resolve_fuses_accumulation_within_the_token_budget(demo_config):
    config = demo_config
    recipe = TrainingSpec()  # 2 x 4 x 512 = 4096 tokens <= 16384
    lv = decide(recipe, "sft", CPU, config, torch.float32, rows=100)
    assert (lv.batch_size, lv.accumulation) == (8, 1)
    lv = decide(recipe, "dpo", CPU, config, torch.float32, rows=100)  # chosen + rejected: 8192 tokens
    assert (lv.batch_size, lv.accumulation) == (8, 1)
    off = decide(with_speed(recipe, max_tokens_per_batch=0), "sft", CPU, config, torch.float32, rows=100)
    assert (off.batch_size, off.accumulation) == (2, 4)
    big = decide(recipe.model_copy(update={"max_length": 4096}), "sft", CPU, config, torch.float32, rows=100)
    assert (big.batch_size, big.accumulation) == (4, 2)  # 4 x 4096 fits 16384: partly fused
    huge = decide(recipe.model_copy(update={"max_length": 16384}), "sft", CPU, config, torch.float32, rows=100)
    assert (huge.batch_size, huge.accumulation) == (2, 4)  # nothing larger than the recipe's micro-batch fits


def test_fused_optimizer_lever_resolves_per_device(demo_config):
    config = demo_config
    gpu = Machine.gpu(free_gib=80)  # the fused optimizer is CUDA's
    on = decide(TrainingSpec(fused_optimizer=True), "sft", gpu, config, torch.bfloat16, rows=10)
    assert on.optim == "adamw_torch_fused" and on.master_fp32 and on.effective()["optim"] == "adamw_torch_fused"
    off = decide(TrainingSpec(fused_optimizer=False), "sft", gpu, config, torch.bfloat16, rows=10)
    assert off.optim == "paged_adamw_32bit" and not off.master_fp32
    eight_bit = decide(TrainingSpec(optim="paged_adamw_8bit"), "sft", gpu, config, torch.bfloat16, rows=10)
    assert eight_bit.optim == "paged_adamw_8bit"  # quantized states: not the same math, left alone
    lowmem = decide(TrainingSpec(fused_optimizer=True, activation_offloading=True), "sft", gpu, config,
                    torch.bfloat16, rows=10)
    assert lowmem.optim == "paged_adamw_32bit" and "memory-saving" in " ".join(lowmem.notes)


def test_cast_trainable_master_fp32_keeps_fp32_under_bf16(tiny_demo):
    from peft import get_peft_model

    from tinyllama_mcp.pipeline.modeling import cast_trainable, load_base
    from tinyllama_mcp.pipeline.recipe.common import lora_config
    from tinyllama_mcp.pipeline.specs import LoraSpec, QuantSpec

    model = get_peft_model(load_base(tiny_demo, QuantSpec(quantization="none"), torch.float32),
                           lora_config(LoraSpec(r=4)))
    cast_trainable(model, torch.bfloat16, master_fp32=True)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cast_trainable(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_torch_fused_adamw_is_the_same_math():
    """adamw_torch_fused vs adamw_torch (what the lever swaps on CUDA; fused AdamW also runs on a CPU)."""
    torch.manual_seed(0)
    params = [torch.randn(64, 8), torch.randn(8, 64), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    out = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=fused, foreach=None if fused else False)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tokens_per_step_scales_the_step_and_the_step_counts(demo_config):
    from tinyllama_mcp.pipeline.recipe.common import total_steps

    config = demo_config
    # 2 x 4 sequences of ~700 tokens: ~5.6k a step -> k = 4
    recipe = TrainingSpec(tokens_per_step=24576, max_length=2048)
    lv = decide(recipe, "sft", CPU, config, torch.float32, rows=3000, mean_tokens=700)
    assert lv.step_scale == 4 and lv.batch_size * lv.accumulation == 32
    assert (lv.batch_size, lv.accumulation) == (8, 4)  # 8 x 2048 = 16384 fits max_tokens_per_batch
    short = decide(recipe.model_copy(update={"max_length": 512}), "sft", CPU, config, torch.float32, rows=3000,
                   mean_tokens=700)  # rows clipped to 512: k = round(24576 / 4096)
    assert short.step_scale == 6 and (short.batch_size, short.accumulation) == (24, 2)
    assert lv.max_steps == -1 and lv.save_steps == 13
    # Epochs: the same rows in a quarter of the steps.
    assert total_steps(3000, recipe) == 375 and total_steps(3000, recipe, lv) == 94
    # max_steps counts recipe-sized steps: the same sequences in ceil(200 / k) steps.
    dpo = TrainingSpec(learning_rate=1e-5, max_steps=200, warmup_ratio=0.1, tokens_per_step=24576)
    lv = decide(dpo, "dpo", CPU, config, torch.float32, rows=12000, mean_tokens=400)  # 800 tokens a pair
    assert lv.step_scale == 4 and lv.max_steps == 50 and total_steps(12000, dpo, lv) == 50
    assert lv.batch_size * lv.accumulation == 32 and lv.batch_size * 1024 <= 16384
    # Off, unknown lengths, or tiny data: the recipe's step.
    assert decide(with_speed(recipe, tokens_per_step=0), "sft", CPU, config, torch.float32, rows=3000,
                  mean_tokens=700).step_scale == 1
    assert decide(recipe, "sft", CPU, config, torch.float32, rows=3000).step_scale == 1
    assert decide(recipe, "sft", CPU, config, torch.float32, rows=12, mean_tokens=700).step_scale == 1
