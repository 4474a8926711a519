"""TRL's trainers with the plan's Trainer-level levers, as subclass overrides (one code path: with Plan.off() each
override hands over to TRL's own method)."""

from __future__ import annotations

from trl import DPOTrainer as TRLDPOTrainer
from trl import SFTTrainer as TRLSFTTrainer

from tinyllama_mcp.pipeline.speed.late_log import LateLog
from tinyllama_mcp.pipeline.speed.lean_steps import LeanSteps
from tinyllama_mcp.pipeline.speed.plan import Plan
from tinyllama_mcp.pipeline.speed.sync_free_loss import SyncFreeLoss


class SFTTrainer(LateLog, SyncFreeLoss, LeanSteps, TRLSFTTrainer):
    """SFT: the sync-free loss and its late log (sync_free_step), the lean step walks."""

    def __init__(self, *args, plan: Plan, **kwargs):
        self.plan = plan
        super().__init__(*args, **kwargs)


class DPOTrainer(LeanSteps, TRLDPOTrainer):
    """DPO: the lean step walks (its other levers act on the model, the collator and the reference pass)."""

    def __init__(self, *args, plan: Plan, **kwargs):
        self.plan = plan
        super().__init__(*args, **kwargs)
