"""speed.sync_free_loss (lever sync_free_step): SFT's loss over positions listed on the CPU, scored in chunks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tinyllama_mcp.pipeline.speed import sync_free_loss

from speed_testlib import ON, run_stage, sft_spec, start_event

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_cross_entropy_is_the_cross_entropy_and_trl_metrics(monkeypatch, compiled):
    """The chunked LM-head loss: the summed cross-entropy, its gradient, and TRL's entropy and top-1 counts, over
    several chunks (a chunk of 4 tokens here, the last of 3), eager and compiled by inductor (here its CPU kernels;
    the chunks' two row counts run through one dynamic graph)."""
    monkeypatch.setattr(sync_free_loss, "CHUNK_LOGIT_BYTES", 4 * 4 * 50)  # 4 tokens a chunk at 50 logits
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (11,))
    scores = sync_free_loss.compiled_chunk_scores() if compiled else sync_free_loss.chunk_scores
    total, entropy, correct = sync_free_loss.LinearCrossEntropy.apply(hidden, weight, targets, scores)
    (total * 0.5).backward()

    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden @ weight.T
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (ref * 0.5).backward()
    probs = logits.detach().softmax(-1)
    assert torch.allclose(total, ref.detach(), rtol=1e-5)
    assert torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(), rtol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())


def test_loss_positions_are_the_shifted_labels():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    positions = sync_free_loss.loss_positions(labels)
    assert positions["loss_index"].tolist() == [0, 1, 5, 6]  # the position before each label, flat over rows
    assert positions["loss_targets"].tolist() == [5, 6, 7, 8]


def test_sync_free_step_falls_back_to_trl_where_the_head_is_not_plain(tmp_path, tiny_demo):
    """A model whose LM head the chunked loss cannot score keeps TRL's loss and the Trainer's NaN check, with a
    note saying why."""
    from transformers import AutoConfig

    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.speed.machine import Machine
    from tinyllama_mcp.pipeline.speed.plan import decide

    # tiny-demo whose config names a logit scale (1.0: the logits themselves are unchanged, Llama ignores it)
    scaled = tmp_path / "scaled-demo"
    shutil.copytree(tiny_demo, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps(dict(config, logit_scale=1.0)))
    # The plan's decision for such a head (what plan_for passes on from sync_free_loss.unsupported)
    issue = "the model scales its logits (logit_scale)"
    plan = decide(sft_spec(dict(ON, sync_free_step=True)).training, "sft", Machine(),
                  AutoConfig.from_pretrained(scaled), torch.float32, rows=16, head_issue=issue)
    assert not plan.sync_free_step and f"sync_free_step skipped: {issue}" in plan.notes

    _, fallback = run_stage(run_sft, sft_spec(dict(ON, sync_free_step=True), str(scaled)), tmp_path / "fallback")
    _, trl = run_stage(run_sft, sft_spec(dict(ON, sync_free_step=False), str(scaled)), tmp_path / "trl")
    start = start_event(tmp_path / "fallback")
    assert not start["levers"]["sync_free_step"]
    assert "sync_free_step skipped: the model scales its logits (logit_scale)" in start["levers"]["lever_notes"]
    assert [(s["loss"], s["grad_norm"]) for s in fallback] == [(s["loss"], s["grad_norm"]) for s in trl]


def test_linear_cross_entropy_refuses_a_trained_head():
    with pytest.raises(ValueError, match="frozen LM head"):
        sync_free_loss.LinearCrossEntropy.apply(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True),
                                                torch.tensor([0, 1, 2]))
