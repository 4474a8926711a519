"""The stages' trainers: the speed levers' trainers (speed.trainers) with validation (recipe.validation) on top."""

from __future__ import annotations

from tinyllama_mcp.pipeline.recipe.validation import DPOValidation, SFTValidation
from tinyllama_mcp.pipeline.speed import trainers as speed_trainers


class SFTTrainer(SFTValidation, speed_trainers.SFTTrainer):
    """SFT: the plan's Trainer-level levers, and the held-out rows scored at checkpoints and at the end."""


class DPOTrainer(DPOValidation, speed_trainers.DPOTrainer):
    """DPO: the plan's Trainer-level levers, and the held-out pairs scored at checkpoints and at the end."""
