"""One decode layer and the head as plain functions of tensors (torch.compile-able with fullgraph).

The residual stream travels as (x, d), the pending add done at the start of the next layer (or the head),
so that inductor fuses add + RMSNorm into one kernel. RMSNorm and RoPE are the project's
`pipeline.nn.ops`; the step may swap in compiled copies of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyllama_mcp.pipeline.engine.lora import lora_delta
from tinyllama_mcp.pipeline.engine.sampling import pick_tokens
from tinyllama_mcp.pipeline.nn import ops as llama_ops


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up, from the fused gate|up projection."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def attend(q, k, v, mask, attn: str):
    """Decode attention. q [b, Hk, G, D] (the G query heads of one KV head), k/v [b, Hk, lb, D], mask [b, 1, 1, lb].

    "sdpa": PyTorch's SDPA (eager paths). "reduce": scores and output as fp32 multiply-and-sum reductions,
    which inductor turns into a few well-parallelised kernels (SDPA's kernels run ~b*Hk blocks at batch 1).
    """
    if attn == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scale = q.shape[-1] ** -0.5
    s = (q.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * scale  # [b, Hk, G, lb]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(q.dtype)  # [b, Hk, G, D]


def gemv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T written as a multiply-and-sum (fp32 accumulation): compiled, inductor emits one Triton reduction
    per weight that also absorbs the producer of h (RMSNorm scaling, SiLU*mul). Only for compiled batch 1:
    eagerly it would materialise [b, N, K]."""
    return (h.float().unsqueeze(-2) * w.float()).sum(-1).to(h.dtype)


def make_decode_layer(H: int, Hk: int, D: int, eps: float, attn: str, rms=None, rope=None, swiglu=None,
                      use_gemv: bool = False):
    """One decode layer: (x, d) -> (x', d'), writing this step's K/V into the layer's cache at `pos`.

    H query heads, Hk KV heads of size D; attn "sdpa" or "reduce" (see `attend`); use_gemv: the four
    projections as multiply-and-sum reductions instead of cuBLAS GEMMs (batch 1, compiled). With `slots` and
    `lora` (a LoraTable's layer: (A, B) per fused projection) each row adds its own adapter's delta.
    """
    rms, rope, swiglu = rms or llama_ops.rms_norm, rope or llama_ops.rope, swiglu or silu_mul
    matmul = gemv if use_gemv else F.linear
    G = H // Hk

    def project(h, w, group, slots, lora):
        y = matmul(h, w)
        return y if lora is None else y + lora_delta(h, *lora[group], slots)

    def layer(x, d, cos, sin, mask, rows, heads, pos, kc, vc, w_in, w_qkv, w_o, w_post, w_gu, w_down,
              slots=None, lora=None):
        b, lb = x.shape[0], mask.shape[-1]
        x = x + d
        qkv = project(rms(x, w_in, eps), w_qkv, 0, slots, lora).view(b, H + 2 * Hk, D)
        qk = rope(qkv[:, : H + Hk], cos, sin)
        idx = (rows.view(b, 1), heads.view(1, Hk), pos.view(b, 1))
        kc.index_put_(idx, qk[:, H:])
        vc.index_put_(idx, qkv[:, H + Hk:])
        q = qk[:, :H].reshape(b, Hk, G, D)
        o = attend(q, kc[:b, :, :lb], vc[:b, :, :lb], mask, attn)
        x = x + project(o.reshape(b, H * D), w_o, 1, slots, lora)
        gate_up = project(rms(x, w_post, eps), w_gu, 2, slots, lora)
        return x, project(swiglu(gate_up), w_down, 3, slots, lora)

    return layer


def make_head(eps: float, rms=None, use_gemv: bool = False):
    """The final add + RMSNorm, the LM head and the next-token choice for position pos + 1."""
    rms = rms or llama_ops.rms_norm
    lin = gemv if use_gemv else F.linear

    def head(x, d, w_norm, w_lm, temp, top_p, seed, pos, sampling: bool):
        logits = lin(rms(x + d, w_norm, eps), w_lm).float()
        return pick_tokens(logits, temp, top_p, seed, pos + 1, sampling)

    return head
