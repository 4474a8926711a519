"""speed.dequantized_base (lever dequantized_base): NF4 base weights dequantized once, the same model."""

from __future__ import annotations

import math

import pytest
import torch

from bnb_cpu import described

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_dequantized_base_is_the_same_model(tiny_demo, cpu_path):
    """NF4 weights dequantized once: the same outputs and LoRA gradients as bitsandbytes' per-call path, on either
    of its CPU paths (the model is in eval mode here, where bitsandbytes' AVX512-BF16 path would repack)."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed.dequantized_base import dequantize_base
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def model_and_grads(dequantized: bool):
        torch.manual_seed(0)
        with described(cpu_path):
            base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="nf4", compute_dtype="fp32"),
                                      torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                init_lora_weights=False))
        if dequantized:
            assert dequantize_base(model) > 0
            assert not any("dequantized" in name for name in model.state_dict())  # never saved
        ids = torch.arange(3, 40).view(1, -1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    loss_off, grads_off = model_and_grads(False)
    loss_on, grads_on = model_and_grads(True)
    assert math.isclose(loss_off, loss_on, rel_tol=1e-6), (loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and grads_off
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6), name
