"""Packed SFT sequences through variable-length attention (speed lever `varlen_attention`).

With packed rows and no mask, transformers builds a block-diagonal mask from the position_ids for every
forward (a GPU sync included), and sdpa then computes every row's full max_length x max_length scores
through a masked kernel. Variable-length flash attention instead takes the packed tokens with the
sequence boundaries (`cu_seq_lens_q`, from the collator) and computes only each sequence's own causal
triangle: the same attention, exactly, for a fraction of the work, and the micro-batch becomes one row.

The implementation is registered with transformers' AttentionInterface under NAME and switched on for
the training loop only (`use`); generation keeps sdpa. On CUDA it calls torch's varlen flash attention
(torch.nn.attention.varlen, torch >= 2.10); elsewhere each sequence runs through causal sdpa on its own,
which is the same computation, so the CPU tests exercise the same packing and boundaries.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

NAME = "tinyllama_mcp_varlen"


def unavailable(device_is_cuda: bool) -> Optional[str]:
    """None when the CUDA varlen kernel can run here (or on a CPU, where the per-sequence path runs)."""
    if not device_is_cuda:
        return None
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 has)"
    return None


@functools.lru_cache(maxsize=1)
def causal_kwargs() -> tuple[tuple[str, object], ...]:
    """How this torch's varlen_attn is asked for causal GQA attention (read once: inspect is slow per call)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11+ / 2.10
    if "enable_gqa" in params:
        extra["enable_gqa"] = True
    return tuple(extra.items())


def _cuda_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling: Optional[float]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **dict(causal_kwargs()))


def end_aligned_causal(queries: int, keys: int, device=None) -> torch.Tensor:
    """(queries, keys) bool: query i sees key j when j <= i + keys - queries (causal, the last query sees every
    key): flash attention's causal mask, and sdpa's is_causal when keys == queries."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def _per_sequence(q, k, v, cu_q, cu_k, scaling: Optional[float], dropout: float) -> torch.Tensor:
    parts = []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist())):
        if q1 > q0:  # (tokens, heads, dim) -> (1, heads, tokens, dim)
            seg = [t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
            mask = None if q1 - q0 == k1 - k0 else end_aligned_causal(q1 - q0, k1 - k0, q.device)
            out = F.scaled_dot_product_attention(*seg, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                                 dropout_p=dropout, enable_gqa=True)
            parts.append(out[0].transpose(0, 1))
    return torch.cat(parts, dim=0)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
              **kwargs):
    """AttentionInterface function: query (batch, heads, seq, dim) -> ((batch, seq, heads, dim), None)."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise RuntimeError("varlen attention runs on packed batches: the batch carries no cu_seq_lens_q/max_length_q "
                           "(speed.packing.PackedRowsCollator with cu_seq_lens=True makes them); "
                           "set varlen_attention=false to use sdpa")
    batch, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    # Key segments other than the query segments (DPO's shared prompts, speed.dpo_packing): gathered keys
    cu_k, max_k, key_index = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k"), kwargs.get("packed_key_index")
    if key_index is not None:
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    else:
        cu_k, max_k = cu, max_len
    if q.is_cuda and dropout == 0.0:
        out = _cuda_varlen(q, k, v, cu, cu_k, int(max_len), int(max_k), scaling)
    else:
        out = _per_sequence(q, k, v, cu, cu_k, scaling, dropout)
    return out.view(batch, length, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)


@contextlib.contextmanager
def use(model) -> Iterator[None]:
    """Run `model` (and the models it wraps: they share one config) with varlen attention inside the block."""
    register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
