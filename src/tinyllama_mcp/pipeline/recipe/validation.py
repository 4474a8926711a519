"""Validation during training, named as OpenAI's fine-tuning API names it: held-out rows scored at every checkpoint
on a fixed sample (`valid_*`) and on all of them after the last step (`full_valid_*`), the best checkpoint recorded.

SFT: loss and mean token accuracy over the labelled tokens; DPO: reward accuracy, reward margin (TRL's
rewards/accuracies and rewards/margins) and the sigmoid DPO loss. Each is a sum over tokens or pairs divided once,
never a mean of batch means, so it does not depend on how the speed levers batch or pack the rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline import data as data_mod
from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.recipe.common import split_eval

VALID_SAMPLE_ROWS = 64  # the rows scored at every checkpoint (a fixed sample: checkpoints compare on the same rows)
SAMPLE, FULL = "valid", "full_valid"  # the figures' prefixes: at checkpoints, and on every row after the last step
FIGURES = {"sft": ("loss", "mean_token_accuracy"), "dpo": ("reward_accuracy", "reward_margin", "loss")}
_DPO_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")  # as TRL's DPO step drops them


@dataclass
class HeldOut:
    """The validation rows of a stage, where they came from (for lineage) and the sample scored at checkpoints."""

    rows: list[dict]
    origin: dict
    sample: list[int]


def held_out(spec, kind: str, rows: list[dict], prepare: Callable[[list[dict]], list[dict]] = lambda r: r
             ) -> tuple[list[dict], Optional[HeldOut]]:
    """(training rows, validation) from spec.validation_dataset (read and checked as the training data is, then
    `prepare`d as its rows were) or training.eval_fraction; validation None when neither is asked."""
    t = spec.training
    if spec.validation_dataset is not None:
        data = data_mod.load(spec.validation_dataset, kind)
        train, valid = rows, prepare(data.rows)
        origin = {"from": "validation_dataset", "source": data.source, "path": data.path, "sha256": data.sha256,
                  "layout": data.layout}
    elif t.eval_fraction > 0:
        train, valid = split_eval(rows, t.eval_fraction, t.seed)
        if not valid:
            raise UserError(f"eval_fraction {t.eval_fraction} holds out no rows: the data has {len(rows)} row(s) and "
                            "a split needs at least 4; give more rows or a separate validation_dataset")
        origin = {"from": "eval_fraction", "eval_fraction": t.eval_fraction, "seed": t.seed}
    else:
        return rows, None
    sample = sorted(random.Random(t.seed).sample(range(len(valid)), min(len(valid), VALID_SAMPLE_ROWS)))
    return train, HeldOut(valid, {**origin, "rows": len(valid), "sample_rows": len(sample)}, sample)


# --------------------------------------------------------------------------- which checkpoint is best
def _rank(stage: str, entry: dict) -> tuple:
    """Larger is better: SFT the lower valid_loss, DPO the higher valid_reward_accuracy, then valid_reward_margin."""
    def finite(name: str, sign: float) -> float:
        value = entry.get(f"{SAMPLE}_{name}")
        return sign * value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf

    if stage == "sft":
        return (finite("loss", -1.0),)
    return finite("reward_accuracy", 1.0), finite("reward_margin", 1.0)


def checkpoint_figures(history: list[dict], stage: str) -> list[dict]:
    """The checkpoint evaluations in a Trainer's log history: step and valid_* figures each."""
    key = f"{SAMPLE}_{FIGURES[stage][0]}"
    return [{k: v for k, v in h.items() if k == "step" or k.startswith(f"{SAMPLE}_")} for h in history if key in h]


def best_checkpoint(history: list[dict], stage: str, checkpoints_dir: Path) -> Optional[dict]:
    """The best evaluated checkpoint (the earliest of equals): step, folder and its valid_* figures."""
    entries = checkpoint_figures(history, stage)
    if not entries:
        return None
    best = max(entries, key=lambda e: (_rank(stage, e), -e["step"]))
    return {**best, "path": str(checkpoints_dir / f"checkpoint-{best['step']}")}


# --------------------------------------------------------------------------- the Trainer's side
class Validation:
    """Trainer mixin: with `self.held_out` set, evaluate() scores it exactly (the stage's _validation_figures),
    every save evaluates first, and the best checkpoint is the Trainer's best_global_step (kept by its rotation).
    Without it the Trainer's own evaluation stays."""

    held_out: Optional[HeldOut] = None
    validation_stage = ""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.held_out is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        prefix = FULL if metric_key_prefix == FULL else SAMPLE
        dataset = self.eval_dataset if prefix == FULL else self.eval_dataset.select(self.held_out.sample)
        dataset = self._remove_unused_columns(dataset, description="validation")
        # In this process, not the training workers: the Trainer caches one eval loader for every dataset.
        batches = torch.utils.data.DataLoader(dataset, batch_size=self.args.eval_batch_size,
                                              collate_fn=self.data_collator)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                figures = self._validation_figures(batches)
            metrics = {f"{prefix}_{name}": figures[name] for name in FIGURES[self.validation_stage]}
            metrics[f"{prefix}_rows"] = len(dataset)
            self.log(dict(metrics))  # in eval mode, so TRL's log adds none of the training metrics
        finally:
            self.model.train(training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _determine_best_metric(self, metrics, trial) -> bool:
        if self.held_out is None:
            return super()._determine_best_metric(metrics, trial)
        best = best_checkpoint(self.state.log_history, self.validation_stage, Path(self.args.output_dir))
        if best is None:
            return False
        self.state.best_global_step = best["step"]
        self.state.best_metric = best[f"{SAMPLE}_{FIGURES[self.validation_stage][0]}"]
        return best["step"] == self.state.global_step


class SFTValidation(Validation):
    """SFT: the labelled tokens' summed NLL and top-1 hits through TRL's fused LM head, over their count."""

    validation_stage = "sft"

    def _validation_figures(self, batches) -> dict[str, float]:
        from tinyllama_mcp.pipeline.speed.sync_free_loss import OWN_KEYS

        sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        for batch in batches:
            batch = self._prepare_inputs(batch)
            inputs = {k: v for k, v in batch.items() if k not in OWN_KEYS}  # the sync-free loss's keys, labels
            with self.compute_loss_context_manager():
                out = self.model(**inputs, labels=batch["labels"], fused_lm_head=True)
            sums += torch.stack([-out.log_probs.double().sum(), out.is_top1.sum().double(),
                                 out.label_mask.sum().double()])
        nll, correct, tokens = sums.tolist()
        return {"loss": nll / max(tokens, 1.0), "mean_token_accuracy": correct / max(tokens, 1.0)}


class DPOValidation(Validation):
    """DPO: each pair's rewards (beta x the policy's minus the reference's log-prob of an answer), as TRL's step
    computes them, the reference read from the precomputed columns when the rows carry them."""

    validation_stage = "dpo"

    def _policy_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        completion = batch["completion_mask"]
        inputs = {k: v for k, v in batch.items() if k not in _DPO_NON_MODEL_KEYS}
        labels = batch["input_ids"].masked_fill(completion == 0, -100)
        with self.compute_loss_context_manager():
            per_token = self.model(**inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        return per_token[:, -(completion.size(1) - 1):].sum(dim=1).chunk(2)

    def _validation_figures(self, batches) -> dict[str, float]:
        margins = []
        for batch in batches:
            batch = self._prepare_inputs(batch)
            chosen, rejected = self._policy_logps(batch)
            if "ref_chosen_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.model, batch)
            margin = (chosen.double() - ref_chosen.double()) - (rejected.double() - ref_rejected.double())
            margins.append(self.beta * margin)
        margin = torch.cat(margins)
        accuracy, mean, loss = torch.stack([(margin > 0).double().mean(), margin.mean(),
                                            -F.logsigmoid(margin).mean()]).tolist()
        return {"reward_accuracy": accuracy, "reward_margin": mean, "loss": loss}


# --------------------------------------------------------------------------- what the recipe calls
def attach(trainer, held: Optional[HeldOut], log: EventLog) -> None:
    """Score `held` at every checkpoint of `trainer` (a Validation trainer), each as a `validation` event."""
    if held is None:
        return
    from transformers import TrainerCallback

    trainer.held_out = held
    stage = trainer.validation_stage

    class ValidationAtCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_evaluate = True  # the Trainer evaluates before it saves

        def on_save(self, args, state, control, **kwargs):
            here = [e for e in checkpoint_figures(state.log_history, stage) if e["step"] == state.global_step]
            if here:
                folder = Path(args.output_dir)
                log.emit("validation", **here[-1], checkpoint=str(folder / f"checkpoint-{state.global_step}"),
                         best_checkpoint=best_checkpoint(state.log_history, stage, folder))

    trainer.add_callback(ValidationAtCheckpoints())


def finish(trainer, log: EventLog) -> Optional[dict]:
    """After the last step (inside the training attention): every held-out row scored, a `validation` event with
    the full_valid_* figures and the best checkpoint; returns the record lineage.json keeps (None: no validation)."""
    held: Optional[HeldOut] = getattr(trainer, "held_out", None)
    if held is None:
        return None
    full = trainer.evaluate(metric_key_prefix=FULL)
    stage, history, folder = trainer.validation_stage, trainer.state.log_history, Path(trainer.args.output_dir)
    best = best_checkpoint(history, stage, folder)
    log.emit("validation", step=trainer.state.global_step, **full, best_checkpoint=best)
    return {**held.origin, "checkpoints": checkpoint_figures(history, stage), "full": full, "best_checkpoint": best}
