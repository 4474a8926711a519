"""DPO's right-padded batches without an attention mask (lever `padding_free` without `varlen_attention`): under
causal attention no real token sees a pad to its right, so the mask changes nothing real and sdpa can take its
flash kernel."""

from __future__ import annotations

from typing import Any

import torch

from tinyllama_mcp.pipeline.nn.llama import decoder_of


def drop_right_padding_mask(model) -> Any:
    """Forward pre-hook on the decoder: drop an attention mask that is only right padding.

    Under causal attention no real token sees a pad to its right, so the outputs at real tokens are
    unchanged; pads' outputs differ but carry no loss. Masks with holes or left padding are kept.
    Returns the hook handle (remove it before generating).
    """
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        if kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None:
            return None
        if bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool((mask[:, 0] == 1).all()):
            kwargs["attention_mask"] = None
            return args, kwargs
        return None

    return decoder_of(model).register_forward_pre_hook(hook, with_kwargs=True)
