"""speed.adapter_switch (plan part quick_adapter_switch): DPO's reference pass switches adapter layers listed once."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_quick_adapter_switch_is_peft_switch(tiny_demo):
    """DPO's reference pass switches the adapter off through model.disable_adapter(): the quick switch gives the
    base model's outputs inside, the adapted outputs and trainable weights back after, and leaves adapters that
    are already off to peft's own context."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed import compiled_layers
    from tinyllama_mcp.pipeline.speed.adapter_switch import quick_adapter_switch
    from tinyllama_mcp.pipeline.specs import QuantSpec

    torch.manual_seed(0)
    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none", compute_dtype="fp32"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, init_lora_weights=False,
                                            target_modules=list(compiled_layers.PROJECTIONS)))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            peft_base = model(input_ids=ids).logits
        assert quick_adapter_switch(model)
        with model.disable_adapter():
            quick_base = model(input_ids=ids).logits
            assert not model.has_active_enabled_adapter
        after = model(input_ids=ids).logits
    assert not torch.equal(adapted, peft_base)
    assert torch.equal(quick_base, peft_base) and torch.equal(after, adapted)
    assert model.has_active_enabled_adapter
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    model.base_model.disable_adapter_layers()  # already off: peft's context runs, and leaves them off
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
