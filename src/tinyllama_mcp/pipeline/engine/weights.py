"""The engine's private copy of a Llama's weights, read once out of a HF `LlamaForCausalLM` or a PEFT model.

Q|K|V and gate|up are fused into one matrix each (one GEMM each). A live LoRA adapter is merged into this
copy (W + s*B@A, in fp32), so serving it costs no extra kernels and the served model, with its adapter, is
left untouched. DoRA, LoRA biases, linear biases and quantized weights raise EngineUnsupported: the caller
serves those with transformers' generate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyllama_mcp.pipeline.nn.llama import causal_lm_of, not_plain_llama


class EngineUnsupported(Exception):
    """The model cannot be served by the engine (architecture, quantized weights, DoRA): use plain HF generate."""


LayerWeights = tuple[torch.Tensor, ...]  # (w_in, w_qkv, w_o, w_post, w_gate_up, w_down), the order the decode layer takes them


@dataclass
class LlamaWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor
    inv_freq: torch.Tensor
    rope_scale: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    context: int  # the model's max_position_embeddings
    lora_merged: bool  # read from a PEFT model: its live adapters are merged into this copy

    @property
    def hidden(self) -> int:
        return self.embed.shape[1]

    @property
    def vocab(self) -> int:
        return self.lm_head.shape[0]


def linear_weight(mod) -> torch.Tensor:
    """The effective weight of a (possibly PEFT-LoRA-wrapped) nn.Linear, LoRA merged in fp32."""
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
        base = linear_weight(mod.base_layer)
        if getattr(mod, "disable_adapters", False):
            return base
        merged = set(getattr(mod, "merged_adapters", []))
        active = mod.active_adapters if isinstance(mod.active_adapters, (list, tuple)) else [mod.active_adapters]
        w = None
        for name in active:
            if name in merged or name not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(name, False):
                raise EngineUnsupported("DoRA adapters are not supported by the engine")
            if getattr(mod, "lora_bias", {}).get(name, False):
                raise EngineUnsupported("LoRA biases are not supported by the engine")
            a, b = mod.lora_A[name].weight.float(), mod.lora_B[name].weight.float()
            delta = b @ a
            if getattr(mod, "fan_in_fan_out", False):
                delta = delta.T
            w = (base.float() if w is None else w) + delta * mod.scaling[name]
        return base if w is None else w.to(base.dtype)
    if getattr(mod, "bias", None) is not None:
        raise EngineUnsupported("linear layers with bias are not supported by the engine")
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # bitsandbytes' Params4bit/Int8Params are packed integer tensors
        raise EngineUnsupported(f"weights of {type(mod).__name__} ({getattr(w, 'dtype', None)}) are not plain 16/32-bit")
    return w.detach()


def read_weights(model) -> LlamaWeights:
    """Read (and fuse) the weights of a plain Llama; raises EngineUnsupported for anything else."""
    hf = causal_lm_of(model)
    cfg = hf.config
    reason = not_plain_llama(cfg)
    if reason is not None:
        raise EngineUnsupported(reason)
    rope = hf.model.rotary_emb
    rope_type = getattr(rope, "rope_type", "default")
    if "dynamic" in str(rope_type):  # the engine's cos/sin tables are computed once, for fixed frequencies
        raise EngineUnsupported(f"rope type {rope_type} is not supported")
    with torch.no_grad():
        layers = []
        for layer in hf.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([linear_weight(at.q_proj), linear_weight(at.k_proj), linear_weight(at.v_proj)], 0)
            gu = torch.cat([linear_weight(mlp.gate_proj), linear_weight(mlp.up_proj)], 0)
            layers.append((layer.input_layernorm.weight.detach(), qkv.contiguous(), linear_weight(at.o_proj),
                           layer.post_attention_layernorm.weight.detach(), gu.contiguous(),
                           linear_weight(mlp.down_proj)))
        return LlamaWeights(
            embed=hf.model.embed_tokens.weight.detach(),
            layers=layers,
            norm=hf.model.norm.weight.detach(),
            lm_head=linear_weight(hf.lm_head),
            inv_freq=rope.inv_freq.detach().float(),
            rope_scale=float(getattr(rope, "attention_scaling", 1.0)),
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            eps=cfg.rms_norm_eps,
            context=getattr(cfg, "max_position_embeddings", 2048),
            lora_merged=hasattr(model, "get_base_model"),
        )


def model_eos_ids(model, tokenizer) -> list[int]:
    """The EOS ids of the tokenizer and of the model's generation config, together."""
    ids = []
    config = getattr(causal_lm_of(model), "generation_config", None)
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if src is None:
            continue
        ids += list(src) if isinstance(src, (list, tuple)) else [src]
    return sorted(set(int(i) for i in ids))
