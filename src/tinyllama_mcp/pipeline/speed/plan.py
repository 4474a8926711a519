"""The one place every speed lever is decided: `decide` resolves each "auto" of a stage's SpeedSpec, in a visible
order, from the spec, the machine (speed.machine), the model's config and the data's size, and returns a frozen
Plan with a note for each lever that is off and why. `Plan.off()` is the recipe exactly as written: every lever
off, so the recipe and the fast path are one code path. docs/speed.md says what each lever does and measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tinyllama_mcp.pipeline.speed import compiled_layers, estimates
from tinyllama_mcp.pipeline.speed.machine import Machine
from tinyllama_mcp.pipeline.specs import SpeedSpec, TrainingSpec

FREE_MEMORY_SHARE = 0.85  # room left for the allocator's fragmentation and the optimizer states
CPU_ACTIVATION_BYTES = 4 * 2**30  # on a CPU, checkpointing 'auto' recomputes only past this much
AUTO_TOKENS_PER_STEP = 24576  # 'auto' on CUDA: ~4x the recipe's ~5.5k real tokens a step on chat data
FUSABLE_OPTIMIZERS = ("paged_adamw_32bit", "adamw_torch")  # fp32-state AdamW: the same math as adamw_torch_fused
COMPILE_MIN_TOKENS = 3_000_000  # 'auto' compiles runs that repay the first step's compile
GRAPH_WIDTH_MULTIPLE = 1024  # cuda_graphs records one graph per packed width: widths are rounded up to this
# 'auto' replays CUDA graphs in runs that repay their recordings: SFT per packed width its rows meet, else per stage
GRAPHS_MIN_TOKENS = {"sft": 20_000_000, "dpo": 24_000_000}
GRAPHS_TOKENS_PER_WIDTH = 2_500_000
AUTO_DATALOADER_WORKERS = 2  # 'auto' where the host's collation would delay the GPU
DEQUANTIZED_BASE_SHARE = 0.25  # 'auto' dequantizes when the 16-bit copies take under this share of free memory


@dataclass(frozen=True)
class Plan:
    """What a stage does, every lever resolved. The last group are parts of levers without a spec field of their
    own (the bench switches them to measure each); they only act where their lever is on."""

    padding_free: bool = False
    gradient_checkpointing: bool = True
    use_liger_kernel: bool = False
    liger_all: bool = True  # with use_liger_kernel: SwiGLU and RMSNorm too, not RoPE alone
    activation_offloading: bool = False
    precompute_ref_log_probs: bool = False
    share_prompt: bool = False
    dataloader_workers: int = 0
    torch_compile: bool = False
    cuda_graphs: bool = False
    sync_free_step: bool = False
    dequantized_base: bool = False
    fused_lora: bool = False
    varlen_attention: bool = False
    batch_size: int = 1  # the micro-batch the Trainer runs
    accumulation: int = 1
    optim: str = "adamw_torch"  # the optimizer the Trainer really runs
    master_fp32: bool = False  # trainable (LoRA) weights kept in fp32 (torch's AdamW keeps states in their dtype)
    pin_memory: bool = False  # batches in pinned memory (CUDA), where they are copied without waiting
    step_scale: int = 1  # k: sequences per optimizer step = the recipe's x k
    tokens_per_step: int = 0  # the resolved budget (0: off)
    max_steps: int = -1  # the spec's max_steps / k, rounded up; -1: epochs
    save_steps: int = 50  # the spec's save_steps / k, rounded up
    notes: tuple[str, ...] = ()
    lean_steps: bool = False  # the Trainer's per-step walks over every module skipped where they change nothing
    quick_adapter_switch: bool = False  # DPO: the reference pass switches the adapter layers listed once
    log_one_step_late: bool = True  # sync_free_step: the step's log read from the GPU at the next step's end
    compile_loss: bool = True  # sync_free_step with torch_compile: the loss's chunks compiled
    compile_reference_pass: bool = True  # torch_compile: DPO's reference pass through the compiled layers too
    aten_random: bool = True  # cuda_graphs: the LoRA dropout drawn by ATen, not inside inductor's kernels
    lora_sum_in_place: bool = True  # torch_compile: each LoRA term added by its GEMM into the base GEMM's output
    graph_attention_bound: bool = True  # cuda_graphs: varlen max_length a bound known before the run
    graph_width_multiple: int = GRAPH_WIDTH_MULTIPLE
    compile_backend: str = "inductor"  # torch_compile's backend (CPU tests trace with aot_eager: no kernels built)

    @classmethod
    def off(cls, t: TrainingSpec, machine: Machine) -> "Plan":
        """The recipe as written: its micro-batch, accumulation, optimizer, checkpointing and steps."""
        return cls(batch_size=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps,
                   optim=t.optim if machine.cuda else "adamw_torch", max_steps=t.max_steps, save_steps=t.save_steps,
                   pin_memory=machine.cuda)

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    @property
    def width_multiple(self) -> int:
        """Packed widths are rounded up to this multiple (0: exact): each width is one CUDA graph recording."""
        return self.graph_width_multiple if self.cuda_graphs else 0

    def liger_kernels(self) -> list[str]:
        if not self.use_liger_kernel:
            return []
        return ["rope", "swiglu", "rms_norm"] if self.liger_all else ["rope"]

    def trainer_args(self) -> dict[str, Any]:
        """The TrainingArguments fields the plan decides (the recipe's own fields are set by the recipe)."""
        args: dict[str, Any] = dict(
            per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=self.accumulation,
            max_steps=self.max_steps, save_steps=self.save_steps, optim=self.optim,
            gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if self.gradient_checkpointing else None,
            use_liger_kernel=self.use_liger_kernel, activation_offloading=self.activation_offloading)
        if self.sync_free_step:
            # Batches copied from pinned memory without waiting, and no NaN check of each micro-batch's loss on the
            # host (speed.sync_free_loss): a NaN loss is then logged as NaN, not replaced by a mean.
            args.update(accelerator_config={"non_blocking": True}, dataloader_pin_memory=self.pin_memory,
                        logging_nan_inf_filter=False)
        if self.use_liger_kernel:
            args["liger_kernel_config"] = {"rope": True, "swiglu": self.liger_all, "rms_norm": self.liger_all}
        if self.dataloader_workers:  # kept for the whole run (not forked again each epoch), two batches ready each
            args.update(dataloader_num_workers=self.dataloader_workers, dataloader_persistent_workers=True,
                        dataloader_prefetch_factor=2)
        else:
            args["dataloader_num_workers"] = 0
        return args

    def effective(self) -> dict[str, Any]:
        """The levers as resolved, for the `start` event and lineage."""
        return {
            "micro_batch_size": self.batch_size, "gradient_accumulation_steps": self.accumulation,
            "padding_free": self.padding_free, "gradient_checkpointing": self.gradient_checkpointing,
            "use_liger_kernel": self.use_liger_kernel, "liger_kernels": self.liger_kernels(),
            "activation_offloading": self.activation_offloading,
            "precompute_ref_log_probs": self.precompute_ref_log_probs, "share_prompt": self.share_prompt,
            "dataloader_workers": self.dataloader_workers, "torch_compile": self.torch_compile,
            "cuda_graphs": self.cuda_graphs, "sync_free_step": self.sync_free_step,
            "packed_width_multiple": self.width_multiple, "dequantized_base": self.dequantized_base,
            "fused_lora": self.fused_lora, "varlen_attention": self.varlen_attention, "optim": self.optim,
            "master_weights_fp32": self.master_fp32, "tokens_per_step": self.tokens_per_step,
            "sequences_per_step": self.batch_size * self.accumulation, "step_scale": self.step_scale,
            "max_steps": self.max_steps, "save_steps": self.save_steps, "lever_notes": list(self.notes),
        }


def decide(t: TrainingSpec, stage: str, machine: Machine, model_config, dtype: torch.dtype, *, rows: int,
           mean_tokens: Optional[float] = None, row_lengths: Optional[list[int]] = None,
           head_issue: Optional[str] = None) -> Plan:
    """Resolve `t.speed` for this stage ("sft" or "dpo") and machine.

    `mean_tokens`: mean real tokens of a training row (its longest sequence, clipped to max_length), which sizes
    token-budget steps and run-length rules (None: unknown). `row_lengths`: each row's tokens (SFT's graphs rule
    counts the widths they pack to). `head_issue`: why the model's LM head cannot take the sync-free loss (None: it
    can; speed.sync_free_loss.unsupported).
    """
    s: SpeedSpec = t.speed
    notes: list[str] = []
    lv: dict[str, Any] = dict(padding_free=s.padding_free, activation_offloading=s.activation_offloading,
                              fused_lora=s.fused_lora, lean_steps=s.lean_steps,
                              quick_adapter_switch=s.lean_steps and stage == "dpo", pin_memory=machine.cuda)
    steps = _step_shape(t, stage, machine, rows, mean_tokens, notes)
    lv.update(steps)
    lv.update(_optimizer(t, machine, notes))

    # Dequantized base weights first: their memory is no longer free for activations.
    copy_bytes = estimates.projection_weights(model_config) * (torch.finfo(dtype).bits // 8)
    free = machine.free_memory
    if s.dequantized_base == "auto":
        # off on a CPU (bitsandbytes' CPU path is not launch-bound), and in the memory-saving mode
        lv["dequantized_base"] = (free is not None and not s.activation_offloading
                                  and copy_bytes < DEQUANTIZED_BASE_SHARE * free)
        if free is not None:
            notes.append(f"dequantized_base auto -> {lv['dequantized_base']} ({copy_bytes / 2**30:.1f} GiB of 16-bit "
                         f"base weights, free {free / 2**30:.1f} GiB"
                         f"{', memory-saving mode' if s.activation_offloading else ''})")
    else:
        lv["dequantized_base"] = bool(s.dequantized_base)
    if lv["dequantized_base"] and free is not None:
        free -= copy_bytes

    per_sequence = t.max_length * (2 if stage == "dpo" else 1)  # DPO runs chosen and rejected in one forward
    tokens = steps["batch_size"] * per_sequence
    if s.gradient_checkpointing == "auto":
        need = estimates.activation_bytes(model_config, tokens, dtype)
        # A CPU's memory is the host's: the tiny and small models it runs fit, so it skips the recompute.
        lv["gradient_checkpointing"] = need > (CPU_ACTIVATION_BYTES if free is None else FREE_MEMORY_SHARE * free)
        notes.append(f"gradient_checkpointing auto -> {lv['gradient_checkpointing']} (estimated activations "
                     f"{need / 2**30:.1f} GiB for {tokens} tokens, free "
                     f"{'n/a' if free is None else f'{free / 2**30:.1f} GiB'})")
    else:
        lv["gradient_checkpointing"] = bool(s.gradient_checkpointing)

    lv["varlen_attention"] = False
    if s.varlen_attention and s.padding_free:
        why_not = machine.varlen_missing if machine.cuda else None
        if getattr(model_config, "attention_dropout", 0.0):
            why_not = "the model has attention dropout (the varlen kernel has none)"
        lv["varlen_attention"] = why_not is None
        if why_not:
            notes.append(f"varlen_attention skipped: {why_not}")

    sequences = steps["batch_size"] * steps["accumulation"]
    trained = estimates.planned_rows(t.num_train_epochs, rows, steps["max_steps"], sequences)
    planned = estimates.planned_tokens(trained, mean_tokens, t.max_length, stage)
    lv["torch_compile"] = False
    if s.torch_compile:
        why_not = _compile_skipped(s, lv, machine, model_config, planned)
        lv["torch_compile"] = why_not is None
        if why_not:
            notes.append(f"torch_compile skipped: {why_not}")

    lv["cuda_graphs"] = False
    if s.cuda_graphs and lv["torch_compile"]:  # (they replay the compiled layers: nothing to say without them)
        least, why = _graphs_min_tokens(t, stage, trained, steps["batch_size"], row_lengths)
        why_not = _graphs_skipped(s, lv, machine, stage, planned, least, why)
        lv["cuda_graphs"] = why_not is None
        if why_not:
            notes.append(f"cuda_graphs skipped: {why_not}")

    lv["sync_free_step"] = False
    if s.sync_free_step:  # the SFT loss over positions the packing collator lists (speed.sync_free_loss)
        if stage != "sft" or not s.padding_free:
            if s.sync_free_step is True:
                notes.append("sync_free_step skipped: it is SFT's, on packed batches (padding_free)")
        elif s.sync_free_step is True or lv["cuda_graphs"]:
            lv["sync_free_step"] = head_issue is None
            if head_issue:
                notes.append(f"sync_free_step skipped: {head_issue}")

    if s.dataloader_workers == "auto":
        # where the host's collation delays the GPU: DPO's step, and SFT's once the GPU sets the pace (graphs)
        busy_gpu = stage == "dpo" or lv["cuda_graphs"]
        lv["dataloader_workers"] = AUTO_DATALOADER_WORKERS if machine.cuda and busy_gpu else 0
    else:
        lv["dataloader_workers"] = s.dataloader_workers

    lv["use_liger_kernel"] = False
    if s.use_liger_kernel:
        if machine.liger_missing is None:
            lv["use_liger_kernel"] = True
            # 'auto': without checkpointing Liger's SwiGLU and RMSNorm cost more host time than they save
            lv["liger_all"] = s.use_liger_kernel is True or lv["gradient_checkpointing"]
            if s.use_liger_kernel == "auto" and lv["torch_compile"] and not lv["liger_all"]:
                # the compiled layers compute RoPE themselves: Liger's would only add its Triton compiles
                lv["use_liger_kernel"] = False
                notes.append("use_liger_kernel auto -> off (the compiled layers fuse RoPE)")
        else:
            notes.append(f"use_liger_kernel skipped: {machine.liger_missing}")

    if s.activation_offloading and not machine.cuda:
        lv["activation_offloading"] = False
        notes.append("activation_offloading skipped: no CUDA device")

    if stage == "dpo":
        lv["share_prompt"] = bool(s.share_prompt and lv["varlen_attention"])
        if s.share_prompt and not lv["varlen_attention"]:
            notes.append("share_prompt skipped: it runs on packed pairs (padding_free with varlen_attention)")
        # The precomputed pass runs the reference once per row, in larger batches and without the adapter
        # switches: it pays when the run trains every row at least once (else it pays for rows never trained on).
        auto = s.precompute_ref_log_probs == "auto"
        lv["precompute_ref_log_probs"] = trained >= rows if auto else bool(s.precompute_ref_log_probs)
    return Plan(**lv, notes=tuple(notes))


def _step_shape(t: TrainingSpec, stage: str, machine: Machine, rows: int, mean_tokens: Optional[float],
                notes: list[str]) -> dict[str, int]:
    """Token-budget optimizer steps (k x the recipe's sequences a step), then the micro-batch shape: the largest
    micro-batch dividing the step's sequences that fits max_tokens_per_batch. The Trainer normalizes an accumulated
    step by all its label tokens, so the gradient is the same whatever the split."""
    s = t.speed
    per_sequence = t.max_length * (2 if stage == "dpo" else 1)
    recipe_sequences = t.per_device_train_batch_size * t.gradient_accumulation_steps
    shape = dict(step_scale=1, tokens_per_step=0, max_steps=t.max_steps, save_steps=t.save_steps,
                 batch_size=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps)
    budget = s.tokens_per_step
    if budget == "auto":
        budget = AUTO_TOKENS_PER_STEP if machine.cuda else 0
    shape["tokens_per_step"] = int(budget)
    if budget and mean_tokens:
        per_row = min(float(mean_tokens), t.max_length) * (2 if stage == "dpo" else 1)
        k = max(1, round(budget / (recipe_sequences * per_row)))
        if rows:
            k = min(k, max(1, rows // recipe_sequences))  # never more than the data's sequences in one step
        shape["step_scale"] = k
        if t.max_steps > 0:
            shape["max_steps"] = -(-t.max_steps // k)
        shape["save_steps"] = -(-t.save_steps // k)
        notes.append(f"tokens_per_step {budget}: {recipe_sequences} x {k} = {recipe_sequences * k} sequences a step "
                     f"(~{recipe_sequences * k * per_row:.0f} real tokens); max_steps {t.max_steps} -> "
                     f"{shape['max_steps']}, save_steps {t.save_steps} -> {shape['save_steps']}")
    step_sequences = recipe_sequences * shape["step_scale"]
    if s.max_tokens_per_batch:
        fits = [b for b in range(1, step_sequences + 1)
                if step_sequences % b == 0 and b * per_sequence <= s.max_tokens_per_batch]
        best = max(fits) if fits else 0
        if best > t.per_device_train_batch_size:
            shape["batch_size"], shape["accumulation"] = best, step_sequences // best
            notes.append(f"micro-batches fused: {t.per_device_train_batch_size} x "
                         f"{step_sequences // t.per_device_train_batch_size} -> {best} x {step_sequences // best}")
    if shape["batch_size"] * shape["accumulation"] != step_sequences:
        shape["batch_size"] = t.per_device_train_batch_size
        shape["accumulation"] = step_sequences // shape["batch_size"]
    return shape


def _optimizer(t: TrainingSpec, machine: Machine, notes: list[str]) -> dict[str, Any]:
    """torch's fused AdamW on CUDA for the fp32-state AdamW optimizers; on a CPU, torch's AdamW (paged and 8-bit
    optimizers live in bitsandbytes' CUDA code)."""
    chosen = dict(optim=t.optim if machine.cuda else "adamw_torch", master_fp32=False)
    if t.speed.fused_optimizer and t.optim in FUSABLE_OPTIMIZERS:
        if not machine.cuda:
            notes.append("fused_optimizer skipped: no CUDA device (adamw_torch)")
        elif t.speed.activation_offloading:
            notes.append(f"fused_optimizer skipped: memory-saving mode keeps {t.optim} (states paged)")
        else:
            chosen = dict(optim="adamw_torch_fused", master_fp32=True)
    return chosen


def _compile_skipped(s: SpeedSpec, lv: dict, machine: Machine, model_config, planned: Optional[float]) -> Optional[str]:
    """Why the compiled decoder layers do not run (None: they do); after varlen_attention and checkpointing."""
    if not lv["varlen_attention"]:
        return "it runs on packed batches (padding_free with varlen_attention)"
    why_not = compiled_layers.unsupported(model_config)
    if why_not is None and machine.cuda:
        why_not = machine.triton_missing
    if why_not is not None or s.torch_compile is True:
        return why_not
    if not machine.cuda:
        return "'auto' compiles on CUDA only"
    if lv["gradient_checkpointing"]:
        return "'auto' compiles only without gradient checkpointing"
    if planned is not None and planned < COMPILE_MIN_TOKENS:
        return (f"'auto' compiles runs of at least {COMPILE_MIN_TOKENS:,} real tokens (~17 s of compile pays back "
                f"after ~2.4M); this one trains ~{planned:,.0f}")
    return None


def _graphs_min_tokens(t: TrainingSpec, stage: str, trained: float, batch: int,
                       row_lengths: Optional[list[int]]) -> tuple[int, str]:
    """The real tokens from which 'auto' replays graphs, and why: SFT's from the widths its rows pack to (when their
    lengths are known), else the stage's fixed GRAPHS_MIN_TOKENS."""
    if stage != "sft" or not row_lengths:
        return GRAPHS_MIN_TOKENS[stage], "each packed width costs ~3 s to record"
    widths = estimates.sft_packed_widths(row_lengths, t.max_length, batch, int(trained) // batch,
                                         GRAPH_WIDTH_MULTIPLE)
    return (max(widths, 1) * GRAPHS_TOKENS_PER_WIDTH,
            f"{GRAPHS_TOKENS_PER_WIDTH:,} a packed width, each ~3 s to record: these rows pack to ~{widths}")


def _graphs_skipped(s: SpeedSpec, lv: dict, machine: Machine, stage: str, planned: Optional[float], least: int,
                    why: str) -> Optional[str]:
    """Why the compiled layers do not run as CUDA graphs (None: they do); after torch_compile is resolved on."""
    if not machine.cuda:
        return "no CUDA device"
    if lv["gradient_checkpointing"]:
        return "not under gradient checkpointing (its recompute would run the layers' graphs inside the backward)"
    if s.cuda_graphs is True:
        return None
    if planned is None or planned < least:
        size = "its size is unknown" if planned is None else f"this one trains ~{planned:,.0f}"
        return f"'auto' replays graphs in {stage.upper()} runs of at least {least:,} real tokens ({why}); {size}"
    return None
