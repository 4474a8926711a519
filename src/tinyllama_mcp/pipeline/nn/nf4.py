"""NF4 weights: the one place that knows which layout bitsandbytes keeps them in.

bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a Linear4bit's weight into a CPU-only layout the first
time the layer runs outside training mode without gradients (`quant_state.packing_format_for_cpu`), and from
then on computes that layer with its own bf16 kernel. `dequantize_4bit` does not know that layout: it reads the
repacked bytes as plain ones and returns wrong weights, so a no-grad pass (DPO's reference, an eval, a generate)
before training would leave every later reader of the weight with garbage. Every NF4 layer the project loads is
therefore kept in the plain layout (`keep_plain_layout`), computed the same way in every pass on every CPU, and
every read of an NF4 weight goes through `dequantized`, which restores the plain layout first if it ever changed.
"""

from __future__ import annotations

import torch


def plain_layout(module: torch.nn.Module) -> None:
    """Put a 4-bit linear's weight back in bitsandbytes' plain layout (its own inverse, as it does before saving
    or moving to a GPU) and keep bitsandbytes from repacking it."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False  # the flag bitsandbytes' forward checks before repacking


def keep_plain_layout(model: torch.nn.Module) -> int:
    """`plain_layout` for every 4-bit linear of `model`; returns how many there are."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        plain_layout(layer)
    return len(layers)


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """The true weight of a 4-bit linear layer, whatever layout bitsandbytes keeps it in, in its quant dtype."""
    import bitsandbytes.functional as bnbf

    plain_layout(module)
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
