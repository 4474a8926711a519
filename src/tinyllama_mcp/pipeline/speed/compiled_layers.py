"""Each decoder layer's training forward as one compiled function (speed lever `torch_compile`).

The SFT step with the other levers on is bound by the host: ~3,000 kernel launches a step, each issued from
Python (HF's layer, the LoRA functions, norms, RoPE, casts, dropout), while the GPU's own work takes about
half the step. Here a Llama decoder layer with its seven LoRA projections is
written as one plain function of tensors (`layer_forward`) and compiled by torch.compile: inductor fuses the
norms, RoPE, SiLU x up, residual adds, casts and the LoRA dropout into a few Triton kernels, AOTAutograd
derives and compiles the backward, and the 22 layers share one compiled graph (the weights are arguments).

The math is the eager path's: HF's RMSNorm (fp32 statistics), RoPE and SwiGLU, and for each projection
y = x W^T + s (d(x) A^T) B^T in the compute dtype, as speed.fused_lora computes it. Attention is the
varlen flash kernel over the packed sequences (speed.varlen_attention) on CUDA; on a CPU, where that kernel
does not exist, the same causal attention within each sequence runs through sdpa under a block-diagonal mask.

A layer takes this path for a training forward with gradients over a packed batch (cu_seq_lens_q) whose seven
projections can all run fused (one active adapter, no DoRA, no bias; see fused_lora.fusable), and for a forward
without gradients over a packed batch with the adapter switched off (DPO's reference pass: the base projections
alone, its own inference graph; Settings.reference_pass). Any other call (evaluation with the adapter on, generation with
its cache) runs the layer's own forward.

With `cuda_graphs` (lever of that name) inductor replays each layer's compiled forward and backward as CUDA graphs
(its CUDA graph trees): the ~2,500 launches of a step's layers cost a few replays of host time. A graph holds its
input addresses, so the layers' weights are marked static (each layer position of the step is a node of the tree,
recorded once with its own weights), a packed width is recorded once (the collators pad widths to a multiple and
fix max_length_q to the width), and every optimizer step starts a new replay of the tree (`step_begin`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from tinyllama_mcp.pipeline.nn import ops as llama_ops
from tinyllama_mcp.pipeline.nn.llama import decoder_of, not_plain_llama
from tinyllama_mcp.pipeline.speed import fused_lora, varlen_attention

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
    lora_sum_in_place: bool = True  # each LoRA term added by its GEMM into the base GEMM's output (lora_linear)


class Settings(NamedTuple):
    """How install() routes a layer (Plan fields): the backend, CUDA graphs, DPO's reference pass through the
    compiled layer too, the LoRA dropout drawn by ATen under graphs, and the LoRA sum in place."""

    backend: str = "inductor"
    cuda_graphs: bool = False
    reference_pass: bool = True
    aten_random: bool = True
    lora_sum_in_place: bool = True


@torch.library.custom_op("tinyllama_mcp::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """x W^T + s xa B^T, the LoRA term accumulated by its GEMM into the base GEMM's output.

    One op so that the compiled graph calls the two GEMMs as they are: written as torch.addmm(x W^T, xa, B^T),
    inductor first copied x W^T into a new buffer for addmm's output, 176 copies of a projection's output a step
    in a step's profile)."""
    return torch.mm(x, weight.t()).addmm_(xa, lora_b.t(), alpha=scaling)


@lora_linear.register_fake
def _lora_linear_shape(x, weight, xa, lora_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0])


def _lora_linear_saved(ctx, inputs, output) -> None:
    _x, weight, xa, lora_b, scaling = inputs
    ctx.save_for_backward(weight, xa, lora_b)
    ctx.scaling = scaling


def _lora_linear_backward(ctx, grad: torch.Tensor):
    weight, xa, lora_b = ctx.saved_tensors
    need_x, _, need_xa, need_b, _ = ctx.needs_input_grad
    grad_x = grad @ weight if need_x else None  # (the base weight is frozen: no gradient)
    grad_xa = (grad @ lora_b) * ctx.scaling if need_xa else None
    grad_b = (grad.t() @ xa) * ctx.scaling if need_b else None
    return grad_x, None, grad_xa, grad_b, None


lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_saved)


def _lora(x, weight, lora_a, lora_b, scaling: float, rate: float, dtype: torch.dtype,
          in_place: bool = True) -> torch.Tensor:
    # speed.fused_lora's forward: y = x W^T + s (d(x) A^T) B^T, every operand in the compute dtype. (A plain add that
    # inductor fuses into y's next reader measured slower than either sum.)
    x = x.to(dtype)
    dropped = F.dropout(x, rate, training=True) if rate > 0 else x
    xa, b = dropped @ lora_a.to(dtype).t(), lora_b.to(dtype)
    if in_place:
        return lora_linear(x, weight, xa, b, scaling)
    return torch.addmm(F.linear(x, weight), xa, b.t(), alpha=scaling)


def layer_forward(h, cos, sin, cu, max_len, keys, mask, norms, weights, loras, constants: LayerConstants) -> torch.Tensor:
    """One Llama decoder layer over packed tokens: h (batch, tokens, hidden) -> the same shape.

    cos, sin: the rotary embedding (batch, tokens, head_dim); cu, max_len: the packed sequences' boundaries
    over the flattened tokens and the longest; keys: None when each sequence attends to itself, else
    (key_index, cu_k, max_len_k): the keys gathered from the tokens by key_index, in segments cu_k, causal to
    each segment's end (DPO's shared prompts, speed.dpo_packing); mask: None on CUDA, else the (tokens, keys)
    block-diagonal causal mask; norms: (input, post-attention) RMSNorm weights; weights: the 7 frozen base
    weights; loras: A, B per projection (PROJECTIONS order), or () for the base projections alone.
    """
    s = constants
    batch_shape = h.shape
    x = h.reshape(-1, batch_shape[-1])
    tokens = x.shape[0]

    def proj(i: int, inp: torch.Tensor) -> torch.Tensor:
        if not loras:  # the base projection alone: the adapter is switched off (DPO's reference pass)
            return F.linear(inp.to(s.dtype), weights[i])
        return _lora(inp, weights[i], loras[2 * i], loras[2 * i + 1], s.scalings[i], s.rates[i], s.dtype,
                     s.lora_sum_in_place)

    normed = llama_ops.rms_norm(x, norms[0], s.eps)
    q = proj(0, normed).view(tokens, s.heads, s.head_dim)
    k = proj(1, normed).view(tokens, s.kv_heads, s.head_dim)
    v = proj(2, normed).view(tokens, s.kv_heads, s.head_dim)
    cos, sin = cos.reshape(tokens, 1, s.head_dim), sin.reshape(tokens, 1, s.head_dim)
    q, k = llama_ops.rope(q, cos, sin), llama_ops.rope(k, cos, sin)
    cu_k, max_len_k = cu, max_len
    if keys is not None:
        key_index, cu_k, max_len_k = keys
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    scale = s.head_dim ** -0.5
    if mask is None:
        from torch.nn.attention.varlen import varlen_attn

        attn = varlen_attn(q, k, v, cu, cu_k, max_len, max_len_k, scale=scale, **dict(s.varlen))
    else:  # (tokens, heads, dim) -> (1, heads, tokens, dim) and back
        attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                              enable_gqa=True)[0].transpose(0, 1)
    x = x + proj(3, attn.reshape(tokens, s.heads * s.head_dim))

    normed = llama_ops.rms_norm(x, norms[1], s.eps)
    x = x + proj(6, F.silu(proj(4, normed)) * proj(5, normed))
    return x.view(batch_shape)


def block_causal_mask(cu: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """(queries, keys) bool: query i sees key j when both lie in one packed segment and j is at most as far
    from its segment's end as i (causal, aligned to the segment's end: j <= i when queries and keys are the
    same tokens)."""
    def place(bounds):
        lengths = (bounds[1:] - bounds[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=bounds.device), lengths)
        from_end = bounds[1:].long()[segment] - torch.arange(int(bounds[-1]), device=bounds.device)
        return segment, from_end

    (segment_q, from_end_q), (segment_k, from_end_k) = place(cu), place(cu_k)
    return (segment_q[:, None] == segment_k[None, :]) & (from_end_k[None, :] >= from_end_q[:, None])


def unsupported(config) -> Optional[str]:
    """None when this model's decoder layers have the shape layer_forward computes, else why not."""
    why_not = not_plain_llama(config)
    if why_not is not None:
        return f"{why_not} (the compiled layer is a plain Llama layer)"
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
def _compiled(backend: str, cuda_graphs: bool = False, aten_random: bool = False):
    import torch._dynamo as dynamo

    # One graph for all layers, a second once the packed width changes (then symbolic); a layer-0 input without
    # gradients, another dropout rate or another stage's shapes add variants: more than the default limit of 8
    # per function can come up in one process (the bench runs many stages).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    return torch.compile(layer_forward, backend=backend, fullgraph=True, dynamic=None,
                         options=inductor_options(cuda_graphs, aten_random))


def inductor_options(cuda_graphs: bool, aten_random: bool) -> Optional[dict]:
    """inductor's options for the compiled layers (no other backend has them): replayed as CUDA graphs, and with
    the LoRA dropout drawn by ATen (Settings.aten_random) rather than by random numbers inside inductor's fused
    kernels: where the GPU sets the pace, ATen's kernel costs less."""
    options = {}
    if cuda_graphs:
        options["triton.cudagraphs"] = True
    if aten_random:
        options["fallback_random"] = True
    return options or None


def _reference_projection(module, x: torch.Tensor) -> Optional[tuple]:
    """(base layer, compute dtype) when this peft LoRA projection runs as its base layer alone now (the adapter
    switched off, as TRL does for DPO's reference pass), in one dtype; else None."""
    if not module.disable_adapters or module.merged:
        return None
    base = module.get_base_layer()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if base.bias is not None or x.dtype != dtype or getattr(base, "compute_dtype", None) not in (None, dtype):
        return None
    return base, dtype


def _arguments(layer, hidden: torch.Tensor, kwargs: dict) -> Optional[tuple]:
    """The compiled call's arguments for this forward, or None when the layer's own forward must run."""
    with_grads = torch.is_grad_enabled()
    settings: Settings = layer._compiled_layer
    if (with_grads and not layer.training) or (not with_grads and not settings.reference_pass):
        return None
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    cu, max_len, rotary = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"), kwargs.get("position_embeddings")
    if cu is None or max_len is None or rotary is None:
        return None
    key_index = kwargs.get("packed_key_index")  # DPO's shared prompts (speed.dpo_packing)
    keys = None if key_index is None else (key_index, kwargs["cu_seq_lens_k"], int(kwargs["max_length_k"]))
    attn, mlp = layer.self_attn, layer.mlp
    modules = [getattr(attn, n) for n in PROJECTIONS[:4]] + [getattr(mlp, n) for n in PROJECTIONS[4:]]
    weights, loras, scalings, rates, dtype = [], [], [], [], None
    for module in modules:
        if not hasattr(module, "lora_A"):  # not a peft LoRA layer
            return None
        if with_grads:
            fused = fused_lora.fusable(module, hidden)
            if fused is None or (dtype is not None and fused[3] != dtype):
                return None  # (projection biases were refused by unsupported())
            (base, scaling, rate), lora_a, lora_b, dtype = fused
            loras += [lora_a, lora_b]
            scalings.append(scaling)
            rates.append(rate)
        else:
            reference = _reference_projection(module, hidden)
            if reference is None or (dtype is not None and reference[1] != dtype):
                return None
            base, dtype = reference
        weights.append(fused_lora.base_weight(base, dtype))
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if hidden.dtype != dtype or any(n.dtype != dtype for n in norms):
        return None  # a mixed-dtype layer keeps peft's casts
    config = attn.config
    on_cuda = hidden.is_cuda
    constants = LayerConstants(config.num_attention_heads, config.num_key_value_heads, attn.head_dim,
                               float(config.rms_norm_eps), tuple(scalings), tuple(rates), dtype,
                               varlen_attention.causal_kwargs() if on_cuda else (), settings.lora_sum_in_place)
    mask = None if on_cuda else block_causal_mask(cu, cu if keys is None else keys[1])
    cos, sin = rotary
    return hidden, cos, sin, cu, int(max_len), keys, mask, norms, tuple(weights), tuple(loras), constants


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    arguments = _arguments(self, hidden_states, kwargs) if not args else None
    if arguments is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    # CUDA graphs replay the training forward and backward; the reference pass (no gradients: DPO's inline or
    # precomputed one, with its own widths) runs the compiled layers without graphs.
    settings: Settings = self._compiled_layer
    graphs = settings.cuda_graphs and torch.is_grad_enabled()
    layer = _compiled(settings.backend, graphs, graphs and settings.aten_random)
    if getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled():
        # transformers checkpoints a layer by wrapping its class's forward, which this path does not call
        return self._gradient_checkpointing_func(layer, *arguments)
    return layer(*arguments)


def install(model, settings: Settings = Settings()) -> int:
    """Route the packed forwards of every decoder layer of `model` (training, and DPO's reference pass) through the
    compiled layer; returns how many layers.

    Only this model's layer instances change (their bound forward); the classes stay as they are.
    `settings.backend`: torch.compile's (inductor on a GPU; the CPU tests trace with aot_eager, the same graph
    capture and autograd split without generating kernels). `settings.cuda_graphs`: replay the layers as CUDA graphs
    (inductor only; call `step_begin` before every optimizer step). Install after dequantize_base, whose weights are
    then static.
    """
    if unsupported(model.config) is not None:
        return 0
    count = 0
    for layer in getattr(decoder_of(model), "layers", ()):
        if hasattr(layer, "self_attn") and hasattr(layer, "mlp") and not hasattr(layer, "_compiled_layer"):
            layer._compiled_layer = settings
            layer.forward = _forward.__get__(layer)
            if settings.cuda_graphs:
                _mark_static(layer)
            count += 1
    return count


def _mark_static(layer) -> None:
    """Tell the CUDA graphs that this layer's weights keep their addresses: replays read them where they are
    (unmarked inputs are copied into the graph's own buffers at every replay). Weights made per call (an NF4
    weight dequantized in the forward) stay unmarked and are copied."""
    import torch._dynamo as dynamo

    tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    for i, name in enumerate(PROJECTIONS):
        module = getattr(layer.self_attn if i < 4 else layer.mlp, name)
        if hasattr(module, "lora_A"):
            for adapter in module.lora_A:
                tensors += [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
            module = module.get_base_layer()
        weight = getattr(module, "dequantized_weight", None)
        if weight is not None:
            tensors.append(weight)
        elif getattr(module.weight, "quant_state", None) is None:
            tensors.append(module.weight)
    for tensor in tensors:
        dynamo.mark_static_address(tensor, guard=False)  # no guard: one graph serves all layers


def step_begin() -> None:
    """Before every optimizer step of a model installed with cuda_graphs: the previous step's graph outputs are
    dead (the Trainer has stepped the optimizer and dropped the gradients), so the tree replays from its root.
    Without it, each step would be recorded as a new branch under the last one."""
    torch.compiler.cudagraph_mark_step_begin()
