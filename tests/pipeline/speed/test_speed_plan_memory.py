"""speed.plan's memory levers: gradient checkpointing, dequantized_base, Liger, offloading, the activation estimate."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.speed import estimates
from tinyllama_mcp.pipeline.speed.machine import Machine
from tinyllama_mcp.pipeline.speed.plan import decide
from tinyllama_mcp.pipeline.specs import TrainingSpec

from speed_testlib import with_speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CPU = Machine()


def test_resolve_cpu_skips_gpu_only_levers_with_a_note(demo_config):
    config = demo_config
    lv = decide(TrainingSpec(activation_offloading=True), "sft", CPU, config, torch.float32, rows=10)
    assert lv.use_liger_kernel is False and lv.activation_offloading is False
    assert lv.gradient_checkpointing is False  # "auto": the tiny model's activations fit
    notes = " ".join(lv.notes)
    assert "use_liger_kernel skipped" in notes and "activation_offloading skipped" in notes
    assert "gradient_checkpointing auto -> False" in notes
    forced = decide(TrainingSpec(gradient_checkpointing=True, use_liger_kernel=False), "sft", CPU, config,
                    torch.float32, rows=10)
    assert forced.gradient_checkpointing is True
    assert [n for n in forced.notes[1:] if not n.startswith(("fused_optimizer skipped", "torch_compile skipped"))] == []
    assert forced.optim == "adamw_torch" and not forced.master_fp32  # CPU: torch's AdamW, weights as before
    assert forced.tokens_per_step == 0 and forced.step_scale == 1  # 'auto' token budget is off on a CPU


def test_activation_estimate_for_tinyllama_shape():
    from types import SimpleNamespace

    tinyllama = SimpleNamespace(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22)
    gib = estimates.activation_bytes(tinyllama, 8 * 2048, torch.bfloat16) / 2**30
    assert 40 < gib < 60  # stock HF + Liger without checkpointing measured 44 GiB at 8 x 2048


def test_spec_accepts_auto_and_bools():
    assert TrainingSpec().speed.gradient_checkpointing == "auto"
    assert TrainingSpec(gradient_checkpointing=False).speed.gradient_checkpointing is False
    with pytest.raises(Exception):
        TrainingSpec(gradient_checkpointing="sometimes")


def test_liger_auto_is_rope_alone_unless_gradient_checkpointing(demo_config):
    config = demo_config
    gpu = Machine.gpu(free_gib=80)  # CUDA with liger-kernel installed

    def kernels(**fields):
        # torch_compile off: 'auto' would compile the layers here, which fuse RoPE and turn Liger's 'auto' off
        lv = decide(TrainingSpec(**{"torch_compile": False, **fields}), "sft", gpu, config, torch.float32, rows=10)
        return lv.liger_kernels(), lv.trainer_args().get("liger_kernel_config")

    every = ["rope", "swiglu", "rms_norm"]
    assert TrainingSpec().speed.use_liger_kernel == "auto"
    assert kernels(gradient_checkpointing=False) == (["rope"], {"rope": True, "swiglu": False, "rms_norm": False})
    assert kernels(gradient_checkpointing=True) == (every, {"rope": True, "swiglu": True, "rms_norm": True})
    assert kernels(use_liger_kernel=True, gradient_checkpointing=False)[0] == every
    assert kernels(use_liger_kernel=False) == ([], None)


def test_dequantized_base_auto_needs_cuda_memory_and_not_the_saving_mode(demo_config):
    config = demo_config
    auto = TrainingSpec(dequantized_base="auto")
    assert TrainingSpec().speed.dequantized_base == "auto"
    assert decide(auto, "sft", CPU, config, torch.float32, rows=10).dequantized_base is False  # CPU
    roomy = Machine.gpu(free_gib=80)  # a GPU with room
    assert decide(auto, "sft", roomy, config, torch.bfloat16, rows=10).dequantized_base is True
    saving = with_speed(auto, activation_offloading=True, gradient_checkpointing=True)
    assert decide(saving, "sft", roomy, config, torch.bfloat16, rows=10).dequantized_base is False
    full = Machine(cuda=True, free_memory=1024, liger_missing=None)  # no room
    assert decide(auto, "sft", full, config, torch.bfloat16, rows=10).dequantized_base is False
