"""One autograd function per LoRA projection, or per group of projections of one input (lever `fused_lora`).

peft runs a LoRA projection as a chain of modules: the base layer (bitsandbytes' 4-bit matmul, its own
autograd function), a clone, the dropout, lora_A, lora_B, a scaling multiply and an add, with a cast of
each fp32 master weight in between. Each is its own Python call and autograd node, 154 projections a step
for TinyLlama, and the SFT step is bound by that Python, not by the GPU.

Here the same math runs as one autograd function per projection:

    forward   y  = x W^T + s (d(x) A^T) B^T            d: LoRA dropout, s: scaling
    backward  dx = dy W + s ((dy B) A) through d,      dA = s (dy B)^T d(x),   dB = s dy^T (d(x) A^T)

The base weight W is frozen, so there is no dW; it is dequantized from NF4 in the forward and again in
the backward, exactly as bitsandbytes does (or taken from the `dequantized_base` copy). The dropout runs
inside, through the kernel F.dropout itself runs (native_dropout), at the rate and mode of peft's module:
the same draws in the same order, without an autograd node and a gradient sum of its own. Compute runs in
the dtype peft's path would use (autocast's, else the input's); projections in any other set-up, an adapter
switched off (DPO's reference pass), merged, DoRA, several adapters or another dropout module, keep peft's
forward.

Projections that read the same input (Q, K and V; gate and up) run as one function: the first one called
(q_proj, gate_proj) computes all of them and leaves each sibling its output, which the sibling returns
when it is called next with that same input tensor (HF's attention and MLP call them in a row). Any other
call computes on its own. Each projection's math, dropout draws and order are unchanged; what goes is two
of every three autograd nodes of Q, K, V and one of gate, up, with their Python.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tinyllama_mcp.pipeline.nn import nf4


def base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of a LoRA projection's base layer, in `dtype` (dequantized when it is NF4)."""
    weight = getattr(base, "dequantized_weight", None)  # speed.dequantized_base
    if weight is None:
        weight = nf4.dequantized(base) if getattr(base.weight, "quant_state", None) is not None else base.weight
    return weight if weight.dtype == dtype else weight.to(dtype)


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same input


class LoraProjections(torch.autograd.Function):
    """For each projection i of one input x: y_i = x W_i^T (+ bias_i) + s_i (d_i(x) A_i^T) B_i^T.

    `members`: one (base layer, scaling s_i, dropout rate p_i) per projection; `weights`: A_1, B_1, A_2, ...
    Returns y_1 alone for one projection, else the tuple of the y_i.
    """

    @staticmethod
    def forward(ctx, x, members, dtype: torch.dtype, *weights):
        # Every operand is cast to `dtype` explicitly (as autocast would): autocast has nothing left to do.
        x2 = x.reshape(-1, x.shape[-1])
        outputs, saved = [], []
        for (base, scaling, rate), lora_a, lora_b in zip(members, weights[0::2], weights[1::2]):
            weight = base_weight(base, dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            # native_dropout is the kernel F.dropout runs (CUDA, and here on a CPU too): the same draws as peft's
            dropped, mask = torch.native_dropout(x2, rate, True) if rate > 0 else (x2, None)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = dropped @ a.t()
            y = F.linear(x2, weight, bias).addmm_(xa, b.t(), alpha=scaling)  # (addmm would copy x W^T first)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            saved += [dropped, mask, xa, a, b]
        ctx.save_for_backward(*saved)
        ctx.members, ctx.dtype, ctx.x_shape = members, dtype, x.shape
        ctx.weight_dtypes = [w.dtype for w in weights]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        weight_grads: list[Optional[torch.Tensor]] = []
        grad_x = None
        for i, ((base, s, rate), grad_y) in enumerate(zip(ctx.members, grads)):
            dropped, mask, xa, a, b = saved[5 * i : 5 * i + 5]
            if grad_y is None:  # this output was not used
                weight_grads += [None, None]
                continue
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.dtype)
            gb = g @ b  # (tokens, r): dy B
            weight_grads.append((gb.t() @ dropped).mul_(s).to(ctx.weight_dtypes[2 * i]))
            weight_grads.append((g.t() @ xa).mul_(s).to(ctx.weight_dtypes[2 * i + 1]))
            if need_x:
                part = g @ base_weight(base, ctx.dtype)
                grad_x = part if grad_x is None else grad_x.add_(part)
                if mask is None:
                    grad_x.addmm_(gb, a, alpha=s)
                else:  # through the dropout: kept entries scaled by 1 / (1 - p), dropped ones get nothing
                    grad_x.addcmul_(gb @ a, mask, value=s / (1.0 - rate))
        return (None if grad_x is None else grad_x.view(ctx.x_shape), None, None, *weight_grads)


def _compute_dtype(x: torch.Tensor, lora_a: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype peft's path computes this projection in, or None when its path mixes dtypes."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if x.dtype == dtype else None
    return x.dtype if lora_a.dtype == x.dtype else None


def _dropout_rate(dropout: torch.nn.Module) -> Optional[float]:
    """The rate the LoRA dropout module applies now (0 when it is off), None for a module of another kind."""
    if isinstance(dropout, torch.nn.Identity):
        return 0.0
    if type(dropout) is torch.nn.Dropout:
        return float(dropout.p) if dropout.training else 0.0
    return None


def fusable(layer, x: torch.Tensor) -> Optional[tuple]:
    """(base, scaling, rate), A, B and the compute dtype when this projection can run fused now, else None."""
    adapters = layer.active_adapters
    if (layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A
            or adapters[0] in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapters[0], False)):
        return None
    base = layer.get_base_layer()
    if base.bias is not None and base.bias.requires_grad:
        return None
    name = adapters[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    dtype, rate = _compute_dtype(x, lora_a), _dropout_rate(layer.lora_dropout[name])
    if dtype is None or rate is None:
        return None
    return (base, float(layer.scaling[name]), rate), lora_a, lora_b, dtype


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    stash = self.__dict__.pop("_group_output", None)
    if stash is not None and stash[0] is x:  # the group's first projection computed this one already
        return stash[1]
    own = fusable(self, x)
    if own is None:
        return type(self).forward(self, x)
    members, weights, followers = [own[0]], [own[1], own[2]], []
    for layer in self.__dict__.get("_group_followers", ()):
        fused = fusable(layer, x)
        if fused is not None and fused[3] == own[3]:
            members.append(fused[0])
            weights += [fused[1], fused[2]]
            followers.append(layer)
    outputs = LoraProjections.apply(x, tuple(members), own[3], *weights)
    if not followers:
        return outputs
    for layer, output in zip(followers, outputs[1:]):
        layer._group_output = (x, output)
    return outputs[0]


def fuse_lora(model) -> int:
    """Route every peft LoRA linear projection of `model` through LoraProjections; returns how many.

    Siblings of GROUPS under one parent module are grouped: the first computes them all. Only this model's
    modules change (their bound forward and two attributes); peft's classes stay as they are.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not hasattr(module, "fused_lora"):
            if isinstance(module.get_base_layer(), torch.nn.Linear):  # bitsandbytes' Linear4bit is one too
                module.forward = _fused_forward.__get__(module)
                module.fused_lora = True
                count += 1
    for parent in model.modules():
        for names in GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if all(getattr(layer, "fused_lora", False) for layer in layers):
                layers[0]._group_followers = tuple(layers[1:])
    return count
