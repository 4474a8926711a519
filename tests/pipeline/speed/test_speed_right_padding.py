"""speed.right_padding (lever padding_free for DPO without varlen_attention): a right-padding mask dropped."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.speed.right_padding import drop_right_padding_mask

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_dropping_a_right_padding_mask_keeps_real_token_outputs(demo_model):
    ids = torch.randint(10, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        ref = demo_model(input_ids=ids, attention_mask=mask).logits
        handle = drop_right_padding_mask(demo_model)
        try:
            seen = []
            probe = demo_model.model.register_forward_pre_hook(
                lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
            out = demo_model(input_ids=ids, attention_mask=mask).logits
            probe.remove()
        finally:
            handle.remove()
    assert seen == [None]  # the mask really was dropped (hooks run in registration order)
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)


def test_left_padding_mask_is_kept(demo_model):
    ids = torch.randint(10, 1000, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    handle = drop_right_padding_mask(demo_model)
    try:
        seen = []
        probe = demo_model.model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        with torch.no_grad():
            demo_model(input_ids=ids, attention_mask=mask)
        probe.remove()
    finally:
        handle.remove()
    assert seen[0] is not None
