"""speed.dpo_packing (levers padding_free with varlen_attention, and share_prompt): DPO's pairs packed."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_packed_preference_batches_give_the_padded_hidden_states(demo_model):
    """DPO packing: the decoder runs only the real tokens as one varlen row; real tokens' hidden states equal the
    padded batch's (under its mask), pads come back as zeros, in the padded layout TRL scores."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tinyllama_mcp.pipeline.speed import dpo_packing

    examples = [{"prompt_ids": list(range(10, 10 + p)), "chosen_ids": list(range(200, 200 + c)),
                 "rejected_ids": list(range(400, 400 + r))} for p, c, r in [(7, 3, 12), (2, 9, 1), (15, 4, 4)]]
    collate = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0))
    batch = collate(examples)
    mask = batch["attention_mask"]
    assert batch["cu_seq_lens_q"].tolist()[-1] == int(mask.sum()) == batch["packed_index"].numel()
    padded = demo_model.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    with dpo_packing.packing(demo_model):
        packed = demo_model.model(**{k: v for k, v in batch.items() if k != "completion_mask"}).last_hidden_state
    assert packed.shape == padded.shape
    real = mask.bool()
    assert torch.allclose(packed[real], padded[real], rtol=1e-4, atol=1e-5)
    assert not packed[~real].any()
    assert demo_model.config._attn_implementation == "sdpa" and not demo_model.model._forward_pre_hooks
    # cuda_graphs' padded width: pad tokens run as a segment of their own, their outputs are dropped
    padded_batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), width_multiple=64)(
        examples)
    total = int(mask.sum())  # 81 real tokens: 128 with the padding
    assert padded_batch["packed_padding"] == 128 - total and padded_batch["max_length_q"] == 128
    assert padded_batch["cu_seq_lens_q"].tolist()[-2:] == [total, 128]
    with dpo_packing.packing(demo_model):
        padded_out = demo_model.model(**{k: v for k, v in padded_batch.items() if k != "completion_mask"})
    assert torch.allclose(padded_out.last_hidden_state, packed, rtol=1e-4, atol=1e-5)
    left = dict(batch, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        collate.inner = lambda _examples: left
        collate(examples)


def test_shared_prompts_give_the_padded_hidden_states_and_gradients(demo_model):
    """share_prompt: a pair's common prefix runs once and both answers attend to it (keys gathered, causal to the
    key segment's end); real tokens' hidden states and the gradients equal the padded batch's, with and without
    cuda_graphs' padded widths."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tinyllama_mcp.pipeline.speed import dpo_packing

    # pair 1's answers begin alike (the shared prefix runs past the prompt); pair 2's rejected answer is one token
    examples = [{"prompt_ids": list(range(10, 10 + p)), "chosen_ids": [300, 301] + list(range(200, 200 + c)),
                 "rejected_ids": [300, 301] + list(range(400, 400 + r))} for p, c, r in [(7, 3, 12), (15, 4, 4)]]
    examples.append({"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12]})
    batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), share_prompt=True)(examples)
    mask = batch["attention_mask"]
    shared = [7 + 2, 15 + 2, 3]
    assert batch["packed_index"].numel() == int(mask.sum()) - sum(shared)  # each prefix packed once
    assert batch["cu_seq_lens_k"].tolist()[-1] == batch["packed_key_index"].numel() == int(mask.sum()) + sum(shared)
    assert dpo_packing.shared_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 1  # one token left each

    def outputs_and_grad(batch_kwargs, pack: bool):
        demo_model.zero_grad()
        with dpo_packing.packing(demo_model) if pack else contextlib.nullcontext():
            hidden = demo_model.model(**batch_kwargs).last_hidden_state
        (hidden[mask.bool()].float() ** 2).mean().backward()
        return hidden.detach(), demo_model.model.layers[0].self_attn.k_proj.weight.grad.clone()

    padded, padded_grad = outputs_and_grad(dict(input_ids=batch["input_ids"], attention_mask=mask), pack=False)
    real = mask.bool()
    for width_multiple, max_sequence in ((0, 0), (32, 0), (32, 24)):
        shared_batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), width_multiple,
                                                       share_prompt=True, max_sequence=max_sequence)(examples)
        packed, packed_grad = outputs_and_grad({k: v for k, v in shared_batch.items() if k != "completion_mask"},
                                               pack=True)
        assert torch.allclose(packed[real], padded[real], rtol=1e-4, atol=1e-5), width_multiple
        assert not packed[~real].any()
        assert torch.allclose(packed_grad, padded_grad, rtol=1e-3, atol=1e-6), width_multiple
        if width_multiple:
            assert shared_batch["packed_padding"] >= 1
            segments = {side: shared_batch[f"cu_seq_lens_{side}"].diff() for side in "qk"}
            if max_sequence:  # (the rows are 21 tokens at most) bounds fixed before the run: max(24, 32), max(24, 64)
                assert (shared_batch["max_length_q"], shared_batch["max_length_k"]) == (32, 64)
                assert all(int(segments[side].max()) <= shared_batch[f"max_length_{side}"] for side in "qk")
            else:  # the widths
                assert shared_batch["max_length_q"] == int(shared_batch["cu_seq_lens_q"][-1]) == 64
                assert shared_batch["max_length_k"] == int(shared_batch["cu_seq_lens_k"][-1])
