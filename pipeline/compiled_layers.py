"""Each decoder layer's training forward as one compiled function (speed lever `torch_compile`, issue 4).

The SFT step with the other levers on is bound by the host: ~3,000 kernel launches a step, each issued from
Python (HF's layer, the LoRA functions, norms, RoPE, casts, dropout), while the GPU's own work takes about
half the step (BENCHMARKS.md, rounds 8-10). Here a Llama decoder layer with its seven LoRA projections is
written as one plain function of tensors (`layer_forward`) and compiled by torch.compile: inductor fuses the
norms, RoPE, SiLU x up, residual adds, casts and the LoRA dropout into a few Triton kernels, AOTAutograd
derives and compiles the backward, and the 22 layers share one compiled graph (the weights are arguments).

The math is the eager path's: HF's RMSNorm (fp32 statistics), RoPE and SwiGLU, and for each projection
y = x W^T + s (d(x) A^T) B^T in the compute dtype, as pipeline.fused_lora computes it. Attention is the
varlen flash kernel over the packed sequences (pipeline.varlen_attention) on CUDA; on a CPU, where that kernel
does not exist, the same causal attention within each sequence runs through sdpa under a block-diagonal mask.

A layer takes this path only for a training forward with gradients over a packed batch (cu_seq_lens_q) whose
seven projections can all run fused (one active adapter, no DoRA, no bias; see fused_lora.fusable); any other
call (DPO's reference pass with the adapter off, evaluation, generation) runs the layer's own forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from pipeline import fused_lora, llama_ops, varlen_attention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LayerConstants(NamedTuple):
    """What the compiled graph treats as constants (one graph serves every layer with these)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scalings: tuple[float, ...]  # LoRA scaling per projection, in PROJECTIONS order
    rates: tuple[float, ...]  # LoRA dropout rate per projection (0: off)
    dtype: torch.dtype  # compute dtype of the projections
    varlen: tuple[tuple[str, object], ...]  # varlen_attn's causal keyword arguments (CUDA); () on a CPU


def _lora(x, weight, lora_a, lora_b, scaling: float, rate: float, dtype: torch.dtype) -> torch.Tensor:
    # pipeline.fused_lora's forward: y = x W^T + s (d(x) A^T) B^T, every operand in the compute dtype
    x = x.to(dtype)
    dropped = F.dropout(x, rate, training=True) if rate > 0 else x
    return torch.addmm(F.linear(x, weight), dropped @ lora_a.to(dtype).t(), lora_b.to(dtype).t(), alpha=scaling)


def layer_forward(h, cos, sin, cu, max_len, mask, norms, weights, loras, constants: LayerConstants) -> torch.Tensor:
    """One Llama decoder layer over packed tokens: h (batch, tokens, hidden) -> the same shape.

    cos, sin: the rotary embedding (batch, tokens, head_dim); cu, max_len: the packed sequences' boundaries
    over the flattened tokens and the longest; mask: None on CUDA, else the (tokens, tokens) block-diagonal
    causal mask; norms: (input, post-attention) RMSNorm weights; weights: the 7 frozen base weights; loras:
    A, B per projection (PROJECTIONS order).
    """
    s = constants
    batch_shape = h.shape
    x = h.reshape(-1, batch_shape[-1])
    tokens = x.shape[0]

    def proj(i: int, inp: torch.Tensor) -> torch.Tensor:
        return _lora(inp, weights[i], loras[2 * i], loras[2 * i + 1], s.scalings[i], s.rates[i], s.dtype)

    normed = llama_ops.rms_norm(x, norms[0], s.eps)
    q = proj(0, normed).view(tokens, s.heads, s.head_dim)
    k = proj(1, normed).view(tokens, s.kv_heads, s.head_dim)
    v = proj(2, normed).view(tokens, s.kv_heads, s.head_dim)
    cos, sin = cos.reshape(tokens, 1, s.head_dim), sin.reshape(tokens, 1, s.head_dim)
    q, k = llama_ops.rope(q, cos, sin), llama_ops.rope(k, cos, sin)
    scale = s.head_dim ** -0.5
    if mask is None:
        from torch.nn.attention.varlen import varlen_attn

        attn = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **dict(s.varlen))
    else:  # (tokens, heads, dim) -> (1, heads, tokens, dim) and back
        attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                              enable_gqa=True)[0].transpose(0, 1)
    x = x + proj(3, attn.reshape(tokens, s.heads * s.head_dim))

    normed = llama_ops.rms_norm(x, norms[1], s.eps)
    x = x + proj(6, F.silu(proj(4, normed)) * proj(5, normed))
    return x.view(batch_shape)


def block_causal_mask(cu: torch.Tensor, tokens: int) -> torch.Tensor:
    """(tokens, tokens) bool: token i sees token j when both lie in one packed sequence and j <= i."""
    lengths = (cu[1:] - cu[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=cu.device).tril()
    return causal & (sequence[:, None] == sequence[None, :])


def unsupported(config) -> Optional[str]:
    """None when this model's decoder layers have the shape layer_forward computes, else why not."""
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} (the compiled layer is Llama's)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the compiled layer has SiLU)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projection biases (the compiled layer has none)"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout (the varlen kernel has none)"
    return None


def gpu_kernels_unavailable() -> Optional[str]:
    """None when inductor can generate GPU kernels here (Triton imports), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"inductor's GPU kernels need Triton, which cannot be imported ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=4)
def _compiled(backend: str):
    import torch._dynamo as dynamo

    # One graph for all layers, a second once the packed width changes (then symbolic); a layer-0 input without
    # gradients, another dropout rate or another stage's shapes add variants: more than the default limit of 8
    # per function can come up in one process (the bench runs many stages).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    return torch.compile(layer_forward, backend=backend, fullgraph=True, dynamic=None)


def _plan(layer, hidden: torch.Tensor, kwargs: dict) -> Optional[tuple]:
    """The compiled call's arguments for this forward, or None when the layer's own forward must run."""
    if not (layer.training and torch.is_grad_enabled()):
        return None
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    cu, max_len, rotary = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"), kwargs.get("position_embeddings")
    if cu is None or max_len is None or rotary is None:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    modules = [getattr(attn, n) for n in PROJECTIONS[:4]] + [getattr(mlp, n) for n in PROJECTIONS[4:]]
    weights, loras, scalings, rates, dtype = [], [], [], [], None
    for module in modules:
        fused = fused_lora.fusable(module, hidden) if hasattr(module, "lora_A") else None  # a peft LoRA layer
        if fused is None or (dtype is not None and fused[3] != dtype):
            return None  # (projection biases were refused by unsupported())
        (base, scaling, rate), lora_a, lora_b, dtype = fused
        weights.append(fused_lora.base_weight(base, dtype))
        loras += [lora_a, lora_b]
        scalings.append(scaling)
        rates.append(rate)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if hidden.dtype != dtype or any(n.dtype != dtype for n in norms):
        return None  # a mixed-dtype layer keeps peft's casts
    config = attn.config
    on_cuda = hidden.is_cuda
    constants = LayerConstants(config.num_attention_heads, config.num_key_value_heads, attn.head_dim, float(config.rms_norm_eps),
                  tuple(scalings), tuple(rates), dtype, varlen_attention.causal_kwargs() if on_cuda else ())
    mask = None if on_cuda else block_causal_mask(cu, hidden.shape[0] * hidden.shape[1])
    cos, sin = rotary
    return hidden, cos, sin, cu, int(max_len), mask, norms, tuple(weights), tuple(loras), constants


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    plan = _plan(self, hidden_states, kwargs) if not args else None
    if plan is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    layer = _compiled(self._compiled_layer_backend)
    if getattr(self, "gradient_checkpointing", False):
        # transformers checkpoints a layer by wrapping its class's forward, which this path does not call
        return self._gradient_checkpointing_func(layer, *plan)
    return layer(*plan)


def install(model, backend: str = "inductor") -> int:
    """Route the training forward of every decoder layer of `model` through the compiled layer; returns how many.

    Only this model's layer instances change (their bound forward); the classes stay as they are. `backend`:
    torch.compile's (inductor on a GPU; the CPU tests trace with aot_eager, the same graph capture and
    autograd split without generating kernels).
    """
    from pipeline.fast import decoder_of

    if unsupported(model.config) is not None:
        return 0
    count = 0
    for layer in getattr(decoder_of(model), "layers", ()):
        if hasattr(layer, "self_attn") and hasattr(layer, "mlp") and not hasattr(layer, "_compiled_layer_backend"):
            layer._compiled_layer_backend = backend
            layer.forward = _forward.__get__(layer)
            count += 1
    return count
