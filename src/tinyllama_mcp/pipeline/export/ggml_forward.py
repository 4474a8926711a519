"""A Llama forward pass on tensors as a GGUF file holds them, computed the way llama.cpp's "llama" graph does.

RoPE rotates adjacent pairs (2i, 2i+1) of each head (ggml's rope, mode LLAMA_ROPE_TYPE_NORM) on the Q/K rows as
stored, so a missing or wrong Q/K permutation shows up as a logits difference. Query head h reads KV head
h // (heads / kv_heads), as ggml broadcasts. fp32 throughout, one sequence at a time.
"""

from __future__ import annotations

from typing import Optional

import torch

from tinyllama_mcp.pipeline.export.llama_layout import LlamaShape
from tinyllama_mcp.pipeline.nn.ops import rms_norm


def rope_adjacent(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (tokens, heads, head_dim); pairs (2i, 2i+1) turned by position * theta^(-2i/head_dim)."""
    tokens, _, dim = x.shape
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(tokens, dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).reshape(x.shape)


def logits(shape: LlamaShape, weights: dict[str, torch.Tensor], ids: list[int],
           deltas: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """(tokens, vocab) logits of `ids`; weights by GGUF name, each plus deltas[name] if given (a LoRA's)."""
    deltas = deltas or {}

    def w(name: str) -> torch.Tensor:
        base = weights[name]
        return base + deltas[name] if name in deltas else base

    d, heads, kv = shape.head_dim, shape.heads, shape.kv_heads
    x = w("token_embd.weight")[torch.tensor(ids)]
    n = len(ids)
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(shape.layers):
        b = f"blk.{i}."
        h = rms_norm(x, w(b + "attn_norm.weight"), shape.rms_eps)
        q = rope_adjacent((h @ w(b + "attn_q.weight").T).view(n, heads, d), shape.rope_theta)
        k = rope_adjacent((h @ w(b + "attn_k.weight").T).view(n, kv, d), shape.rope_theta)
        v = (h @ w(b + "attn_v.weight").T).view(n, kv, d)
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5 + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
        x = x + attn @ w(b + "attn_output.weight").T
        h = rms_norm(x, w(b + "ffn_norm.weight"), shape.rms_eps)
        gate, up = h @ w(b + "ffn_gate.weight").T, h @ w(b + "ffn_up.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ w(b + "ffn_down.weight").T
    x = rms_norm(x, w("output_norm.weight"), shape.rms_eps)
    return x @ w("token_embd.weight" if shape.tied else "output.weight").T
