"""The Trainer's per-step walks over the whole model taken out of a step that is bound by Python (plan part
`lean_steps`), where their answer cannot change while training.

A peft-wrapped TinyLlama has ~1,800 modules and ~3,000 parameters, and each step the Trainer walks them four times:
- `floating_point_ops` (its `total_flos` log) counts the non-embedding parameters: counted once here, the same
  6 x tokens x parameters;
- `model.train()` resets every module's mode: skipped when every module already is in that mode (it would change
  nothing; transformers' own train() acts only on a change of mode);
- `model.zero_grad()` and the gradient clipping visit every parameter: only the trainable ones, the only ones with
  gradients, are visited (the same norm, the same clipping).
The first two are the Trainer's (`LeanSteps`, a Trainer mixin); the model's two are `skip_idle_walks`.
"""

from __future__ import annotations

from functools import cached_property


class LeanSteps:
    """Trainer mixin: the parameter count and the clipped parameters found once, with `self.plan.lean_steps`."""

    @cached_property
    def _lean_facts(self) -> tuple[list, int, str]:
        model = self.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        return trainable, model.num_parameters(exclude_embeddings=True), getattr(model, "main_input_name",
                                                                                 "input_ids")

    def _lean(self) -> bool:
        return self.plan.lean_steps and hasattr(self.model, "num_parameters")

    def floating_point_ops(self, inputs) -> int:
        if not self._lean():
            return super().floating_point_ops(inputs)
        _, parameters, main_input = self._lean_facts
        return 6 * inputs[main_input].numel() * parameters if main_input in inputs else 0

    def _clip_grad_norm(self, model):
        if not self._lean():
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._lean_facts[0], self.args.max_grad_norm)


def skip_idle_walks(model) -> None:
    """Give this model a `train()` that returns at once when every module already is in the asked mode, and a
    `zero_grad()` over its trainable parameters only. Only this instance changes; its class stays as it is."""
    modules = list(model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train(mode: bool = True):
        if all(m.training == mode for m in modules):
            return model
        return type(model).train(model, mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for p in trainable:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    model.train, model.zero_grad = train, zero_grad
