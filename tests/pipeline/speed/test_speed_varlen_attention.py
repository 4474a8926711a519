"""speed.varlen_attention (lever varlen_attention): packed sequences attend within their own boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllama_mcp.pipeline.speed.packing import PackedRowsCollator

from speed_testlib import sft_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_varlen_attention_is_the_masked_packed_attention(demo_model, tokenizer):
    """Packed sequences through varlen attention (one row, sequence boundaries): the block-diagonal mask's loss
    and gradients."""
    from tinyllama_mcp.pipeline.speed import varlen_attention

    examples = sft_examples(tokenizer, 6)
    pad = tokenizer.pad_token_id
    longest = max(len(e["input_ids"]) for e in examples)
    masked_batch = PackedRowsCollator(pad_token_id=pad, capacity=longest + 20)(examples)
    varlen_batch = PackedRowsCollator(pad_token_id=pad, capacity=10_000, cu_seq_lens=True)(examples)
    assert masked_batch["input_ids"].shape[0] > 1 and varlen_batch["input_ids"].shape[0] == 1

    def loss_and_grad(batch):
        demo_model.zero_grad()
        loss = demo_model(**batch).loss
        loss.backward()
        return loss.item(), demo_model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded_batch = PackedRowsCollator(pad_token_id=pad, capacity=10_000, cu_seq_lens=True,
                                      width_multiple=256)(examples)  # lever cuda_graphs' padded width
    assert padded_batch["input_ids"].shape[1] % 256 == 0 and padded_batch["input_ids"].shape[1] > varlen_batch[
        "input_ids"].shape[1]

    masked_loss, masked_grad = loss_and_grad(masked_batch)
    with varlen_attention.use(demo_model):
        assert demo_model.config._attn_implementation == varlen_attention.NAME
        varlen_loss, varlen_grad = loss_and_grad(varlen_batch)
        padded_loss, padded_grad = loss_and_grad(padded_batch)
        with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
            demo_model(**masked_batch)  # no boundaries: refused, never attended across sequences
    assert demo_model.config._attn_implementation == "sdpa"  # generation afterwards keeps sdpa
    assert math.isclose(masked_loss, varlen_loss, rel_tol=1e-5), (masked_loss, varlen_loss)
    assert torch.allclose(masked_grad, varlen_grad, rtol=1e-4, atol=1e-6)
    assert math.isclose(padded_loss, varlen_loss, rel_tol=1e-5), (padded_loss, varlen_loss)
    assert torch.allclose(padded_grad, varlen_grad, rtol=1e-4, atol=1e-6)
