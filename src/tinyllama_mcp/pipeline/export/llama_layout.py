"""How a Hugging Face Llama checkpoint maps onto llama.cpp's GGUF layout: tensor names, Q/K row order, shape keys.

Why Q and K are permuted: Meta's Llama applies RoPE to adjacent pairs of each head's dimensions (2i, 2i+1), and so
does ggml's rope for the "llama" architecture (LLAMA_ROPE_TYPE_NORM). Hugging Face's conversion reordered the rows of
q_proj and k_proj so that transformers can rotate the two halves of a head instead (rotate_half: pairs (i, i + d/2)).
A GGUF file must hold the rows in the interleaved order again: per head, HF row i goes to row 2i and HF row i + d/2 to
row 2i + 1. Only the output rows of q_proj and k_proj (and so a LoRA's lora_B of them) move; K uses the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.nn.llama import not_plain_llama

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"
T = gguf.MODEL_TENSOR
# HF projection -> (llama.cpp tensor, which head count permutes its rows: None, "heads" or "kv_heads").
PROJECTIONS = {
    "self_attn.q_proj": (T.ATTN_Q, "heads"),
    "self_attn.k_proj": (T.ATTN_K, "kv_heads"),
    "self_attn.v_proj": (T.ATTN_V, None),
    "self_attn.o_proj": (T.ATTN_OUT, None),
    "mlp.gate_proj": (T.FFN_GATE, None),
    "mlp.up_proj": (T.FFN_UP, None),
    "mlp.down_proj": (T.FFN_DOWN, None),
}
NORMS = {"input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}


def to_ggml_rows(w, n_head: int):
    """HF's rotate-half row order -> llama.cpp's interleaved one (numpy or torch; rows are dim 0)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_hf_rows(w, n_head: int):
    """The inverse of to_ggml_rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class LlamaShape:
    """What a llama.cpp "llama" model needs to know of the network, read from an HF config or from GGUF keys."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def permute_heads(self, which: Optional[str]) -> Optional[int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads}.get(which) if which else None

    @classmethod
    def of_config(cls, config) -> "LlamaShape":
        """The shape of an HF LlamaConfig; UserError for what a GGUF "llama" model cannot express."""
        why = not_plain_llama(config)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        heads = config.num_attention_heads
        if why is None and rope.get("rope_type", "default") != "default":
            why = f"RoPE scaling {rope.get('rope_type')!r} is not written by this export"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if why is None and head_dim * heads != config.hidden_size:
            why = "its head_dim times the head count is not hidden_size"
        if why is not None:
            raise UserError(f"cannot export this model to GGUF faithfully: {why}; export 'safetensors' (and 'peft' "
                            "for an adapter) instead, which keep the checkpoint as transformers loads it")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads, kv_heads=config.num_key_value_heads or heads,
                   context=config.max_position_embeddings, rope_theta=_f32(theta), rms_eps=_f32(config.rms_norm_eps),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(self.context)
        writer.add_embedding_length(self.hidden)
        writer.add_block_count(self.layers)
        writer.add_feed_forward_length(self.intermediate)
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_vocab_size(self.vocab)

    @classmethod
    def read(cls, fields: dict, tensor_names: set[str]) -> "LlamaShape":
        """From a GGUF file's key/values (see gguf_read.fields_of); KeyError names a missing key."""
        key = gguf.Keys.LLM
        arch = fields[gguf.Keys.General.ARCHITECTURE]

        def get(template: str):
            return fields[template.format(arch=arch)]

        return cls(vocab=int(get(key.VOCAB_SIZE)), hidden=int(get(key.EMBEDDING_LENGTH)),
                   intermediate=int(get(key.FEED_FORWARD_LENGTH)), layers=int(get(key.BLOCK_COUNT)),
                   heads=int(get(gguf.Keys.Attention.HEAD_COUNT)), kv_heads=int(get(gguf.Keys.Attention.HEAD_COUNT_KV)),
                   context=int(get(key.CONTEXT_LENGTH)), rope_theta=float(get(gguf.Keys.Rope.FREQ_BASE)),
                   rms_eps=float(get(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
                   tied=f"{gguf.TENSOR_NAMES[T.OUTPUT]}.weight" not in tensor_names)


def _f32(value) -> float:
    """As GGUF stores it (float32), so a shape read back compares equal."""
    return float(np.float32(value))


def tensor_map(shape: LlamaShape) -> dict[str, tuple[str, Optional[int]]]:
    """HF parameter name -> (GGUF tensor name, head count that permutes its rows or None)."""
    names = {
        "model.embed_tokens.weight": (f"{gguf.TENSOR_NAMES[T.TOKEN_EMBD]}.weight", None),
        "model.norm.weight": (f"{gguf.TENSOR_NAMES[T.OUTPUT_NORM]}.weight", None),
    }
    if not shape.tied:
        names["lm_head.weight"] = (f"{gguf.TENSOR_NAMES[T.OUTPUT]}.weight", None)
    for i in range(shape.layers):
        for hf, (tensor, which) in PROJECTIONS.items():
            names[f"model.layers.{i}.{hf}.weight"] = (f"{gguf.TENSOR_NAMES[tensor].format(bid=i)}.weight",
                                                      shape.permute_heads(which))
        for hf, tensor in NORMS.items():
            names[f"model.layers.{i}.{hf}.weight"] = (f"{gguf.TENSOR_NAMES[tensor].format(bid=i)}.weight", None)
    return names
