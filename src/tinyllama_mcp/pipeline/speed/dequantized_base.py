"""NF4 base weights dequantized once (lever `dequantized_base`): the values bitsandbytes recomputes in every call,
kept as 16-bit copies and multiplied by plain F.linear."""

from __future__ import annotations

import torch


def dequantize_base(model) -> int:
    """Give every bitsandbytes 4-bit linear a 16-bit copy of its weight, dequantized once, and a forward that
    multiplies with it. bitsandbytes' own training path dequantizes the weight to the input's dtype and calls
    F.linear, forward and backward, every time: the copy holds those same values, so outputs and gradients are
    unchanged while ~4 bitsandbytes calls (and their Python) per layer and step go away.

    The copy is a plain attribute, not a buffer: checkpoints, adapters and merges never see it; the NF4
    weights stay where they were. Returns the bytes the copies take (0: no 4-bit layers).
    """
    import bitsandbytes as bnb

    from tinyllama_mcp.pipeline.speed.fused_lora import base_weight

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "dequantized_weight"):
            weight = base_weight(module, module.compute_dtype or module.weight.quant_state.dtype)
            module.dequantized_weight = weight
            module.forward = _dequantized_forward.__get__(module)  # this module only
            total += weight.numel() * weight.element_size()
    return total


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
