"""DPO's reference pass switches the adapter off and on every step: over adapter layers listed once (lever part
`quick_adapter_switch`), not by walking the whole model as peft's context does."""

from __future__ import annotations

import contextlib


def quick_adapter_switch(model) -> bool:
    """Give this peft model a `disable_adapter` that switches its LoRA layers, listed once, off and on again.

    TRL runs DPO's reference pass inside peft's `model.disable_adapter()` every step. For LoRA that context walks the
    whole module tree three times (`get_model_status`, which also formats every module as text, then disabling and
    enabling every adapter layer): the largest Python cost of a DPO step. Here the same per-layer calls run (`enable_adapters(False)`, then `(True)`, which also sets the adapter
    weights' requires_grad as peft does) over the layers found once. Where peft's context does more (prompt
    learning, adaption prompts, trained biases, auxiliary training wrappers, adapter layers already off or mixed),
    peft's own runs. Only this model instance changes. Returns whether it was installed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
        return False
    modules = list(model.modules())
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules):
        return False
    layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
    peft_switch = model.disable_adapter

    @contextlib.contextmanager
    def disable_adapter():
        config = model.peft_config[model.active_adapter]
        if (config.is_prompt_learning or config.is_adaption_prompt or getattr(config, "bias", "none") != "none"
                or not layers or any(layer.disable_adapters for layer in layers)):
            with peft_switch():
                yield
            return
        was_disabled = model._adapters_disabled
        for layer in layers:
            layer.enable_adapters(False)
        model._adapters_disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            model._adapters_disabled = was_disabled

    model.disable_adapter = disable_adapter
    return True
