"""One autograd function per LoRA projection (speed lever `fused_lora`, issue 4).

peft runs a LoRA projection as a chain of modules: the base layer (bitsandbytes' 4-bit matmul, its own
autograd function), a clone, the dropout, lora_A, lora_B, a scaling multiply and an add, with a cast of
each fp32 master weight in between. Each is its own Python call and autograd node, 154 projections a step
for TinyLlama, and the SFT step is bound by that Python, not by the GPU (BENCHMARKS.md, profile).

Here the same math runs as one autograd function per projection:

    forward   y  = x W^T + s (d(x) A^T) B^T            d: LoRA dropout, s: scaling
    backward  dx = dy W + s ((dy B) A) through d,      dA = s (dy B)^T d(x),   dB = s dy^T (d(x) A^T)

The base weight W is frozen, so there is no dW; it is dequantized from NF4 in the forward and again in
the backward, exactly as bitsandbytes does (or taken from the `dequantized_base` copy). The dropout stays
peft's own module, called as peft calls it, so its masks are the same draws. Compute runs in the dtype
peft's path would use (autocast's, else the input's); projections in any other set-up, an adapter switched
off (DPO's reference pass), merged, DoRA or several adapters, keep peft's forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of a LoRA projection's base layer, in `dtype` (dequantized when it is NF4)."""
    weight = getattr(base, "dequantized_weight", None)  # pipeline.fast.dequantize_base
    if weight is None:
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is not None:
            import bitsandbytes.functional as bnbf

            weight = bnbf.dequantize_4bit(base.weight.data, quant_state)
        else:
            weight = base.weight
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoraProjection(torch.autograd.Function):
    """y = x W^T (+ bias) + s (x_dropped A^T) B^T; `x_dropped` None means no dropout (it is x)."""

    @staticmethod
    def forward(ctx, x, x_dropped, lora_a, lora_b, base, scaling: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit, as autocast would make them
            weight = base_weight(base, dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            x2 = x.reshape(-1, x.shape[-1])
            dropped = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = dropped @ a.t()
            y = torch.addmm(F.linear(x2, weight, bias), xa, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, xa, a, b)
        ctx.base, ctx.scaling, ctx.dtype = base, scaling, dtype
        ctx.same_input = x_dropped is None
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        dropped, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_dropped, need_a, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.dtype)
            gb = g @ b  # (tokens, r): dy B
            grad_a = (gb.t() @ dropped).mul_(s).to(ctx.a_dtype) if need_a else None
            grad_b = (g.t() @ xa).mul_(s).to(ctx.b_dtype) if need_b else None
            grad_x = grad_dropped = None
            if need_x or need_dropped:
                shape = (*grad_y.shape[:-1], a.shape[1])
                if ctx.same_input:
                    grad_x = torch.addmm(g @ base_weight(ctx.base, ctx.dtype), gb, a, alpha=s).view(shape)
                else:
                    grad_x = (g @ base_weight(ctx.base, ctx.dtype)).view(shape) if need_x else None
                    grad_dropped = (gb @ a).mul_(s).view(shape) if need_dropped else None
        return grad_x, grad_dropped, grad_a, grad_b, None, None, None


def _compute_dtype(layer, x: torch.Tensor, lora_a: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype peft's path computes this projection in, or None when its path mixes dtypes."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if x.dtype == dtype else None
    return x.dtype if lora_a.dtype == x.dtype else None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = self.active_adapters
    plain = (not args and not kwargs and not self.disable_adapters and not self.merged and len(adapters) == 1
             and adapters[0] in self.lora_A and adapters[0] not in getattr(self, "lora_variant", {})
             and not self.use_dora.get(adapters[0], False))
    base = self.get_base_layer()
    if plain and (base.bias is None or not base.bias.requires_grad):
        name = adapters[0]
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = _compute_dtype(self, x, lora_a)
        if dtype is not None:
            dropout = self.lora_dropout[name]
            x_dropped = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
            return LoraProjection.apply(x, x_dropped, lora_a, lora_b, base, float(self.scaling[name]), dtype)
    return type(self).forward(self, x, *args, **kwargs)


def fuse_lora(model) -> int:
    """Route every peft LoRA linear projection of `model` through LoraProjection; returns how many.

    Only this model's modules change (their bound forward); peft's classes stay as they are.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not hasattr(module, "fused_lora"):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear):  # bitsandbytes' Linear4bit is one too
                module.forward = _fused_forward.__get__(module)
                module.fused_lora = True
                count += 1
    return count
