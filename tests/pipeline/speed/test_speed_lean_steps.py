"""speed.lean_steps (plan part lean_steps): the Trainer's per-step walks over every module skipped, the same answers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_trimmed_trainer_overhead_gives_the_same_answers(tiny_demo, tmp_path):
    """Counting FLOPs once, skipping no-op mode walks and visiting only trainable parameters: same results."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed.lean_steps import LeanSteps, skip_idle_walks
    from tinyllama_mcp.pipeline.speed.plan import Plan
    from tinyllama_mcp.pipeline.specs import QuantSpec

    class LeanTrainer(LeanSteps, Trainer):  # the mixin over transformers' own Trainer, as speed.trainers does TRL's
        def __init__(self, *args, plan: Plan, **kwargs):
            self.plan = plan
            super().__init__(*args, **kwargs)

    torch.manual_seed(0)
    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    trainer = LeanTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                              max_grad_norm=0.01, use_cpu=True),
                          plan=Plan(lean_steps=True))
    ids = torch.arange(3, 40).view(1, -1)
    inputs = {"input_ids": ids, "labels": ids}
    model(**inputs).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flops = Trainer.floating_point_ops(trainer, inputs)  # transformers' own walks
    norm = Trainer._clip_grad_norm(trainer, model)
    clipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():  # back to the unclipped gradients
        if n in grads:
            p.grad = grads[n].clone()

    skip_idle_walks(model)
    assert trainer.floating_point_ops(inputs) == flops > 0
    assert torch.equal(trainer._clip_grad_norm(model), norm)
    for n, p in model.named_parameters():
        if n in clipped:
            assert torch.equal(p.grad, clipped[n]), n
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    layer = model.base_model.model.model.layers[0]
    layer.eval()  # one submodule out of training mode: train() must still walk and restore it
    assert model.train() is model and layer.training and layer.mlp.down_proj.lora_dropout["default"].training
    model.eval()
    assert not any(m.training for m in model.modules())
