"""speed.fused_lora (lever fused_lora): each LoRA projection, and projections of one input, as one autograd function."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_fused_lora_is_the_same_math(tiny_demo, quantization, dropout):
    """One autograd function per projection: peft's outputs and LoRA gradients, with the same dropout draws."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed import fused_lora
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def model_and_grads(fused: bool):
        torch.manual_seed(0)
        base = modeling.load_base(str(tiny_demo), QuantSpec(quantization=quantization, compute_dtype="fp32"),
                                  torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
        if quantization == "none":
            model.enable_input_require_grads()  # dx through every projection, as under checkpointing
        if fused:
            assert fused_lora.fuse_lora(model) == 7 * model.config.num_hidden_layers
            attention = model.base_model.model.model.layers[0].self_attn
            assert attention.q_proj._group_followers == (attention.k_proj, attention.v_proj)  # Q, K, V: one function
        model.train()
        torch.manual_seed(1)  # the dropout draws
        ids = torch.arange(3, 40).view(1, -1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with model.disable_adapter(), torch.no_grad():  # adapter off (DPO's reference pass): the base alone
            reference = model(input_ids=ids, labels=ids).loss.item()
        with torch.no_grad():  # a sibling called on another input than its group's first projection: on its own
            attention = model.base_model.model.model.layers[0].self_attn
            attention.q_proj(torch.ones(2, 3, model.config.hidden_size))
            k_alone = attention.k_proj(torch.full((2, 3, model.config.hidden_size), 0.5))
        return loss.item(), grads, reference, k_alone

    loss_off, grads_off, ref_off, k_off = model_and_grads(False)
    loss_on, grads_on, ref_on, k_on = model_and_grads(True)
    assert math.isclose(loss_off, loss_on, rel_tol=1e-6), (loss_off, loss_on)
    if dropout == 0.0:
        assert torch.allclose(k_off, k_on, rtol=1e-5, atol=1e-6)
    assert ref_off == ref_on and not math.isclose(ref_on, loss_on, rel_tol=1e-4)
    assert grads_off.keys() == grads_on.keys() and len(grads_off) == 14 * 2
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6), name


def test_fused_lora_under_gradient_checkpointing(tiny_demo):
    """The recompute of a checkpointed layer runs the grouped functions again: the same gradients as without."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed import fused_lora
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none"), torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        fused_lora.fuse_lora(model)
        model.train()
        ids = torch.arange(3, 40).view(1, -1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6), name
