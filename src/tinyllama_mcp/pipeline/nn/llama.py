"""The model shape the project's own code computes: a plain Llama decoder layer (RMSNorm, RoPE, grouped-query
attention, a SiLU-gated MLP, seven linear projections without biases). The compiled training layers and the
generation engine compute exactly this; any other model keeps transformers' own modules. No torch import here:
the server's specs read PROJECTIONS."""

from __future__ import annotations

from typing import Optional

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def not_plain_llama(config) -> Optional[str]:
    """None when `config` describes a plain Llama decoder, else why not (one phrase)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        return f"model_type {model_type!r} is not Llama"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not SiLU"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "its projections have biases"
    return None


def causal_lm_of(model):
    """The causal LM (e.g. LlamaForCausalLM) under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The decoder stack (e.g. LlamaModel) under a causal LM, peft-wrapped or not."""
    model = causal_lm_of(model)
    return getattr(model, "model", model)
