"""What the recipe calls, one named call per kind of speed-up: plan the levers, pick the collator, prepare the
model, hold the attention context, precompute DPO's reference. Each does nothing a Plan.off() leaves off."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.speed import (
    adapter_switch, compiled_layers, dpo_packing, reference_logps, sync_free_loss, varlen_attention,
)
from tinyllama_mcp.pipeline.speed.dequantized_base import dequantize_base
from tinyllama_mcp.pipeline.speed.fused_lora import fuse_lora
from tinyllama_mcp.pipeline.speed.lean_steps import skip_idle_walks
from tinyllama_mcp.pipeline.speed.machine import Machine
from tinyllama_mcp.pipeline.speed.packing import PACK_ROW_TOKENS, PackedRowsCollator
from tinyllama_mcp.pipeline.speed.plan import Plan, decide
from tinyllama_mcp.pipeline.speed.right_padding import drop_right_padding_mask
from tinyllama_mcp.pipeline.specs import TrainingSpec

REFERENCE_BATCHES = 4  # DPO's precomputed reference runs in batches of this many micro-batches (no gradients)


def plan_for(t: TrainingSpec, stage: str, model, dtype: torch.dtype, *, rows: int, mean_tokens: Optional[float],
             row_lengths: Optional[list[int]] = None, overrides: Optional[dict[str, Any]] = None) -> Plan:
    """The stage's plan on this machine for the loaded `model`; `overrides`: Plan fields set afterwards (the
    bench's switches)."""
    head_issue = sync_free_loss.unsupported(model) if stage == "sft" else None
    plan = decide(t, stage, Machine.read(), model.config, dtype, rows=rows, mean_tokens=mean_tokens,
                  row_lengths=row_lengths, head_issue=head_issue)
    return plan.replace(**overrides) if overrides else plan


def sft_collator(plan: Plan, pad_token_id: int, max_length: int) -> Optional[PackedRowsCollator]:
    """The packing collator of padding_free SFT (None: TRL's padded batches)."""
    if not plan.padding_free:
        return None
    # varlen attention costs each sequence only its own length: the whole micro-batch goes in one row
    capacity = plan.batch_size * max_length if plan.varlen_attention else max(max_length, PACK_ROW_TOKENS)
    return PackedRowsCollator(pad_token_id=pad_token_id, capacity=capacity, cu_seq_lens=plan.varlen_attention,
                              width_multiple=plan.width_multiple, loss_positions=plan.sync_free_step,
                              max_sequence=max_length, attention_bound=plan.graph_attention_bound)


def dpo_collator(plan: Plan, trl_collator, max_length: int):
    """TRL's preference collator, wrapped to pack the pairs when they run packed."""
    if not (plan.padding_free and plan.varlen_attention):
        return trl_collator
    return dpo_packing.PackedPairsCollator(trl_collator, plan.width_multiple, plan.share_prompt, max_length,
                                           plan.graph_attention_bound)


def prepare_model(trainer, plan: Plan, dtype: torch.dtype) -> None:
    """The model-side levers, once the Trainer has wrapped the model in its adapter: the trainable weights' dtype,
    NF4 weights dequantized once, fused LoRA functions, compiled decoder layers, the lean module walks, DPO's
    adapter switch."""
    model = trainer.model
    modeling.cast_trainable(model, dtype, master_fp32=plan.master_fp32)
    if plan.dequantized_base:
        dequantize_base(model)
    if plan.fused_lora:
        fuse_lora(model)
    if plan.torch_compile:
        compiled_layers.install(model, compiled_layers.Settings(
            backend=plan.compile_backend, cuda_graphs=plan.cuda_graphs, reference_pass=plan.compile_reference_pass,
            aten_random=plan.aten_random, lora_sum_in_place=plan.lora_sum_in_place))
        if plan.cuda_graphs:
            trainer.add_callback(_graph_steps_callback())
    if plan.lean_steps:
        skip_idle_walks(model)
    if plan.quick_adapter_switch:
        adapter_switch.quick_adapter_switch(model)


def _graph_steps_callback():
    """A TrainerCallback that starts each optimizer step's replay of the layers' CUDA graphs."""
    from transformers import TrainerCallback

    class GraphSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            compiled_layers.step_begin()

    return GraphSteps()


@contextlib.contextmanager
def training_attention(plan: Plan, model, stage: str) -> Iterator[None]:
    """Around training (and the eval loss, whose batches are the training collator's); generation afterwards keeps
    sdpa and its masks. SFT: varlen attention. DPO: packed pairs, or right-padded rows without their mask."""
    if not plan.padding_free:
        yield
    elif stage == "sft":
        with varlen_attention.use(model) if plan.varlen_attention else contextlib.nullcontext():
            yield
    elif plan.varlen_attention:
        with dpo_packing.packing(model):
            yield
    else:
        hook = drop_right_padding_mask(model)
        try:
            yield
        finally:
            hook.remove()


def precompute_reference(trainer, plan: Plan) -> Optional[dict]:
    """DPO's reference log-probs for every row, before the first step (inside training_attention); its rows and
    seconds, part of the run's cost. None when the plan runs the reference in every step."""
    if not plan.precompute_ref_log_probs:
        return None
    return reference_logps.precompute(trainer, plan.batch_size * REFERENCE_BATCHES, plan.dataloader_workers)
