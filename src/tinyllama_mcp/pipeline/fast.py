"""Speed levers for the SFT and DPO stages (issue 4): each one a TrainingSpec field that can be switched off.

- `padding_free` (SFT): each micro-batch's sequences are packed first-fit-decreasing into rows of at most
  `max_length` tokens, with `position_ids` restarting at every sequence and no attention mask; transformers
  then masks across the packed sequences (`masking_utils.find_packed_sequence_indices`), so no token sees
  another sequence. Same sequences per step, same loss tokens: the same gradient as the padded batch,
  with far fewer pad tokens computed. Rows (not one long row) keep attention cost at rows x max_length^2.
- `padding_free` (DPO): TRL's DPO padding-free is disabled upstream. Its batches are right-padded, and
  under causal attention no real token can see a pad to its right, so the attention mask is dropped
  (exact for every real token) and sdpa takes the flash kernel with native GQA instead of a masked kernel.
- `gradient_checkpointing: "auto"`: off when the estimated activations of one micro-batch fit in free GPU memory.
- `use_liger_kernel`: Liger's RoPE/SwiGLU/RMSNorm Triton kernels (CUDA only: skipped on CPU with a note); 'auto':
  all three under gradient checkpointing (less memory), else RoPE only (less host time a step).
- `fused_lora`: each LoRA projection as one autograd function (pipeline.fused_lora).
- `varlen_attention` (with padding_free): one packed row per micro-batch, variable-length attention over the
  sequence boundaries (pipeline.varlen_attention). SFT: instead of max_length rows under a block-diagonal mask;
  DPO: instead of TRL's padded rows (pipeline.dpo_packing).
- `activation_offloading`: TRL's offloading of saved activations to pinned CPU memory (CUDA only).
- `precompute_ref_log_probs` (DPO): reference log-probs computed once, before training, on the prepared model
  (pipeline.dpo_reference).
- `dataloader_workers`: worker processes collate the next batches while the GPU trains, and DPO's precomputed
  reference pass (data preparation off the critical path); 'auto': AUTO_DATALOADER_WORKERS for DPO on CUDA and for
  SFT with cuda_graphs, else none.
- `share_prompt` (DPO, with varlen_attention): the prompt a pair's chosen and rejected rows share runs through the
  decoder once, and both answers attend to it (pipeline.dpo_packing).
- `fused_optimizer`: torch's fused AdamW (fp32 states, fp32 LoRA master weights) instead of the paged
  bitsandbytes AdamW on CUDA.
- `torch_compile`: each decoder layer's training forward as one compiled function (pipeline.compiled_layers); 'auto':
  on CUDA with packed varlen batches, no gradient checkpointing, and runs long enough to repay the compile.
- `cuda_graphs` (with torch_compile): the compiled layers replayed as CUDA graphs (inductor's CUDA graph trees),
  one recording per packed width; the packed widths are padded up to a multiple of GRAPH_WIDTH_MULTIPLE (the
  padding a segment of its own, labelled -100) so a run sees a few widths, each recorded once. 'auto': runs long
  enough to repay the recordings.
- `sync_free_step` (SFT, packed): a step without host reads of the GPU (pipeline.sft_loss), its log written one
  step late (pipeline.late_log); 'auto': with cuda_graphs, where the GPU sets the pace and every read leaves it
  idle.
- `dequantized_base`: the NF4 base weights dequantized once (the values bitsandbytes recomputes every call)
  and used by plain F.linear: the same model, fewer launches per step, ~2 bytes a base weight of memory.
- `tokens_per_step`: k times the recipe's sequences per optimizer step, so a step holds ~tokens_per_step real
  tokens; max_steps and save_steps are divided by k (the same sequences are trained), the schedule keeps its
  shape over the fewer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tinyllama_mcp.pipeline import sft_loss

# Saved activations per token per decoder layer without checkpointing, in units of the compute dtype's
# size: ~16 x hidden + 8 x intermediate (LoRA dropout copies included). TinyLlama at b8 x 2048 in bf16:
# 155 KB/token/layer, 56 GB a step; stock HF + Liger measured 44 GiB (PERF_NOTES), so this errs high.
ACT_HIDDEN_FACTOR, ACT_INTERMEDIATE_FACTOR = 16, 8
PACK_ROW_TOKENS = 2048  # SFT packed rows hold at least this many tokens (attention cost grows with the row)
FREE_MEMORY_SHARE = 0.85  # leave room for the allocator's fragmentation and the optimizer states
AUTO_TOKENS_PER_STEP = 24576  # 'auto' on CUDA: ~4x the recipe's ~5.5k real tokens a step on chat data
FUSABLE_OPTIMIZERS = ("paged_adamw_32bit", "adamw_torch")  # fp32-state AdamW: the same math as adamw_torch_fused
# 'auto' compiles the decoder layers only for runs that repay the compile: on an H200 it cost ~17 s of first step
# and then saved ~7 us a token (29.9k -> 37.8k tok/s, bench round 11), so it pays after ~2.4M real tokens.
COMPILE_MIN_TOKENS = 3_000_000
# cuda_graphs: a graph is recorded per packed width, so widths are rounded up to this multiple: the recipe's 8 chat
# rows pack to ~2k-10k tokens, ~8 widths of 1,024 (~512 pad tokens a step on average).
GRAPH_WIDTH_MULTIPLE = 1024
# cuda_graphs: varlen attention's max_length a bound known before the run, not the width (graph_attention_bound; the
# bench switches it off in c-graphs-width-bound)
GRAPH_ATTENTION_BOUND = True
# 'auto' replays CUDA graphs only for runs that repay the recordings (one per packed width; DPO's shared prompts add
# key widths). H200, round 14: a run's recordings took ~22 s (SFT, ~8 widths) and ~25-29 s (DPO, ~11 width pairs) in
# all, and replays then saved ~2.3 us a real token (SFT: 49.5k -> 55.9k tok/s) and 2.2-5.5 us (DPO's steps): paid back
# after ~9.5M (SFT) and ~5-11M (DPO) tokens. About twice that leaves a margin. SFT's rule counts the widths its rows
# pack to (sft_packed_widths; ~3 s and ~1.3M tokens of payback each, twice that asked): the bench's chat rows meet
# ~12 widths over a long run (30M), rows that all fill max_length one (round 17, H200: 1.12x without graphs over a
# 40 s run, its recording included).
GRAPHS_MIN_TOKENS = {"sft": 20_000_000, "dpo": 24_000_000}
GRAPHS_TOKENS_PER_WIDTH = 2_500_000
PACKED_WIDTHS_SAMPLE = 20_000  # micro-batches drawn to count an SFT run's packed widths
# Collating a DPO step's batch (TRL's preference collator, the packing) takes ~15 ms of Python on a 2.5 GHz core: two
# workers keep the next batches ready while the GPU trains (H200: median step 120 ms against 138 ms, BENCHMARKS.md
# round 13). SFT's collation is lighter: its host-bound step measured no faster with workers, its step replayed as CUDA
# graphs did (93-94 ms against 97 ms, round 14), so 'auto' gives them to DPO and to SFT with cuda_graphs.
AUTO_DATALOADER_WORKERS = 2
DEQUANTIZED_BASE_SHARE = 0.25  # 'auto' dequantizes when the 16-bit copies take under this share of free memory


def fused_optimizer_ok() -> bool:
    """Whether the fused AdamW lever applies here (CUDA); a function so CPU tests can force the path."""
    return torch.cuda.is_available()


@dataclass
class Levers:
    """What the stage actually does, after resolving 'auto' and what this machine can run."""

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
    batch_size: int = 1  # micro-batch the Trainer runs (accumulation fused in when it fits max_tokens_per_batch)
    accumulation: int = 1
    optim: str = "adamw_torch"  # the optimizer the Trainer really runs
    master_fp32: bool = False  # trainable (LoRA) weights kept in fp32 (torch AdamW keeps states in the params' dtype)
    step_scale: int = 1  # k: sequences per optimizer step = the recipe's x k
    tokens_per_step: int = 0  # resolved budget (0: off)
    max_steps: int = -1  # the spec's max_steps / k (rounded up); -1: epochs
    save_steps: int = 50  # the spec's save_steps / k (rounded up)
    notes: list[str] = field(default_factory=list)

    @property
    def width_multiple(self) -> int:
        """Packed widths are rounded up to this multiple (0: exact): each width is one CUDA graph recording."""
        return GRAPH_WIDTH_MULTIPLE if self.cuda_graphs else 0

    def config_kwargs(self) -> dict[str, Any]:
        """TrainingArguments fields of the levers (gradient checkpointing and the batch shape are set apart)."""
        kwargs = dict(use_liger_kernel=self.use_liger_kernel, activation_offloading=self.activation_offloading)
        if self.sync_free_step:
            # Batches copied to the GPU from pinned memory without waiting, and no NaN check of each micro-batch's
            # loss on the host (pipeline.sft_loss): a NaN loss is then logged as NaN, not replaced by a mean.
            kwargs.update(accelerator_config={"non_blocking": True}, dataloader_pin_memory=torch.cuda.is_available(),
                          logging_nan_inf_filter=False)
        if self.use_liger_kernel:
            kwargs["liger_kernel_config"] = {"rope": True, "swiglu": self.liger_all, "rms_norm": self.liger_all}
        return kwargs

    def liger_kernels(self) -> list[str]:
        if not self.use_liger_kernel:
            return []
        return ["rope", "swiglu", "rms_norm"] if self.liger_all else ["rope"]

    def effective(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "padding_free": self.padding_free,
            "gradient_checkpointing": self.gradient_checkpointing,
            "use_liger_kernel": self.use_liger_kernel,
            "liger_kernels": self.liger_kernels(),
            "activation_offloading": self.activation_offloading,
            "precompute_ref_log_probs": self.precompute_ref_log_probs,
            "share_prompt": self.share_prompt,
            "dataloader_workers": self.dataloader_workers,
            "torch_compile": self.torch_compile,
            "cuda_graphs": self.cuda_graphs,
            "sync_free_step": self.sync_free_step,
            "packed_width_multiple": self.width_multiple,
            "dequantized_base": self.dequantized_base,
            "fused_lora": self.fused_lora,
            "varlen_attention": self.varlen_attention,
            "optim": self.optim,
            "master_weights_fp32": self.master_fp32,
            "tokens_per_step": self.tokens_per_step,
            "sequences_per_step": self.batch_size * self.accumulation,
            "step_scale": self.step_scale,
            "max_steps": self.max_steps,
            "save_steps": self.save_steps,
            "lever_notes": list(self.notes),
        }


def liger_available() -> Optional[str]:
    """None when Liger kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (Liger's kernels are Triton GPU kernels)"
    try:
        import liger_kernel  # noqa: F401
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return f"liger-kernel/triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def activation_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Estimated saved activations of one micro-batch of `tokens` tokens without gradient checkpointing."""
    size = torch.finfo(dtype).bits // 8
    per_layer = ACT_HIDDEN_FACTOR * config.hidden_size + ACT_INTERMEDIATE_FACTOR * config.intermediate_size
    return tokens * config.num_hidden_layers * per_layer * size


def projection_weights(config) -> int:
    """Weights of the 7 linear projections of every decoder layer (what NF4 quantizes)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = hidden * (q + 2 * kv) + q * hidden  # q, k, v, o
    return config.num_hidden_layers * (attention + 3 * hidden * inter)  # + gate, up, down


def planned_rows(t, lv: Levers, rows: int) -> float:
    """Rows the run will train: max_steps' worth of micro-batches, else its epochs over the data."""
    if lv.max_steps > 0:
        return lv.max_steps * lv.batch_size * lv.accumulation
    return t.num_train_epochs * rows


def planned_tokens(t, lv: Levers, rows: int, mean_tokens: Optional[float], stage: str) -> Optional[float]:
    """Real tokens the run will train, estimated from the rows' mean length (None: unknown)."""
    if not mean_tokens:
        return None
    return planned_rows(t, lv, rows) * min(float(mean_tokens), t.max_length) * (2 if stage == "dpo" else 1)


def compile_skipped(t, lv: Levers, model_config, stage: str, rows: int, mean_tokens: Optional[float]) -> Optional[str]:
    """Why the compiled decoder layers do not run for this stage (None: they do); after varlen_attention and
    gradient checkpointing are resolved."""
    from tinyllama_mcp.pipeline import compiled_layers

    if not lv.varlen_attention:
        return "it runs on packed batches (padding_free with varlen_attention)"
    why_not = compiled_layers.unsupported(model_config)
    if why_not is None and torch.cuda.is_available():
        why_not = compiled_layers.gpu_kernels_unavailable()
    if why_not is not None or t.torch_compile is True:
        return why_not
    if not torch.cuda.is_available():
        return "'auto' compiles on CUDA only"
    if lv.gradient_checkpointing:
        return "'auto' compiles only without gradient checkpointing"
    planned = planned_tokens(t, lv, rows, mean_tokens, stage)
    if planned is not None and planned < COMPILE_MIN_TOKENS:
        return (f"'auto' compiles runs of at least {COMPILE_MIN_TOKENS:,} real tokens (~17 s of compile pays back "
                f"after ~2.4M); this one trains ~{planned:,.0f}")
    return None


def sft_packed_widths(lengths: list[int], max_length: int, batch: int, micro_batches: int, seed: int = 0) -> int:
    """Distinct packed widths (multiples of GRAPH_WIDTH_MULTIPLE) that `micro_batches` SFT micro-batches of `batch`
    rows meet, each packed into one row as PackedRowsCollator does with varlen attention; the rows drawn in random
    order, epoch after epoch, as the Trainer's sampler draws them (at most PACKED_WIDTHS_SAMPLE micro-batches)."""
    import random

    clipped = [min(n, max_length) for n in lengths]
    if not clipped or batch < 1:
        return 0
    rng, queue, widths = random.Random(seed), [], set()
    for _ in range(min(micro_batches, PACKED_WIDTHS_SAMPLE)):
        if len(queue) < batch:
            epoch = clipped[:]
            rng.shuffle(epoch)
            queue += epoch
        group, queue = queue[:batch], queue[batch:]
        widths.add(padded_width(sum(group), GRAPH_WIDTH_MULTIPLE))
    return len(widths)


def graphs_min_tokens(t, lv: Levers, stage: str, rows: int, row_lengths: Optional[list[int]]) -> tuple[int, str]:
    """The real tokens from which 'auto' replays graphs, and why: SFT's from the widths its rows pack to (when their
    lengths are known), else the stage's fixed GRAPHS_MIN_TOKENS."""
    if stage != "sft" or not row_lengths:
        return GRAPHS_MIN_TOKENS[stage], "each packed width costs ~3 s to record"
    micro_batches = int(planned_rows(t, lv, rows)) // lv.batch_size
    widths = sft_packed_widths(row_lengths, t.max_length, lv.batch_size, micro_batches)
    return (max(widths, 1) * GRAPHS_TOKENS_PER_WIDTH,
            f"{GRAPHS_TOKENS_PER_WIDTH:,} a packed width, each ~3 s to record: these rows pack to ~{widths}")


def graphs_skipped(t, lv: Levers, stage: str, rows: int, mean_tokens: Optional[float],
                   row_lengths: Optional[list[int]] = None) -> Optional[str]:
    """Why the compiled layers do not run as CUDA graphs (None: they do); after torch_compile is resolved on."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if lv.gradient_checkpointing:
        return "not under gradient checkpointing (its recompute would run the layers' graphs inside the backward)"
    if t.cuda_graphs is True:
        return None
    planned = planned_tokens(t, lv, rows, mean_tokens, stage)
    least, why = graphs_min_tokens(t, lv, stage, rows, row_lengths)
    if planned is None or planned < least:
        size = "its size is unknown" if planned is None else f"this one trains ~{planned:,.0f}"
        return f"'auto' replays graphs in {stage.upper()} runs of at least {least:,} real tokens ({why}); {size}"
    return None


def free_memory_bytes() -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free


def resolve(t, stage: str, model_config, dtype: torch.dtype, *, rows: int,
            mean_tokens: Optional[float] = None, row_lengths: Optional[list[int]] = None) -> Levers:
    """Resolve the lever fields of a TrainingSpec for this stage and machine (call after loading the model).

    `mean_tokens`: mean real tokens of one training row (its longest rendered sequence, clipped to max_length);
    sizes the token-budget optimizer step. None: the step stays the recipe's. `row_lengths`: each row's tokens (SFT:
    'auto' cuda_graphs counts the widths they pack to).
    """
    lv = Levers(padding_free=t.padding_free, activation_offloading=t.activation_offloading,
                fused_lora=t.fused_lora, batch_size=t.per_device_train_batch_size,
                accumulation=t.gradient_accumulation_steps,
                max_steps=t.max_steps, save_steps=t.save_steps)

    # DPO runs chosen and rejected in one forward: twice the rows.
    per_sequence = t.max_length * (2 if stage == "dpo" else 1)
    recipe_sequences = t.per_device_train_batch_size * t.gradient_accumulation_steps

    # Token-budget optimizer steps: k x the recipe's sequences per step.
    budget = t.tokens_per_step
    if budget == "auto":
        budget = AUTO_TOKENS_PER_STEP if torch.cuda.is_available() else 0
    lv.tokens_per_step = int(budget)
    if budget and mean_tokens:
        per_row = min(float(mean_tokens), t.max_length) * (2 if stage == "dpo" else 1)
        k = max(1, round(budget / (recipe_sequences * per_row)))
        if rows:
            k = min(k, max(1, rows // recipe_sequences))  # never more than the data's sequences in one step
        lv.step_scale = k
        if t.max_steps > 0:
            lv.max_steps = -(-t.max_steps // k)
        lv.save_steps = -(-t.save_steps // k)
        lv.notes.append(
            f"tokens_per_step {budget}: {recipe_sequences} x {k} = {recipe_sequences * k} sequences a step "
            f"(~{recipe_sequences * k * per_row:.0f} real tokens); max_steps {t.max_steps} -> {lv.max_steps}, "
            f"save_steps {t.save_steps} -> {lv.save_steps}"
        )
    step_sequences = recipe_sequences * lv.step_scale

    # Micro-batch shape: the largest micro-batch dividing the step's sequences whose padded size fits
    # max_tokens_per_batch (else the recipe's micro-batch when it divides the step). The Trainer normalizes an
    # accumulated step by all its label tokens, so the gradient is the same whatever the split.
    if t.max_tokens_per_batch:
        fits = [b for b in range(1, step_sequences + 1)
                if step_sequences % b == 0 and b * per_sequence <= t.max_tokens_per_batch]
        best = max(fits) if fits else 0
        if best > t.per_device_train_batch_size:
            lv.batch_size, lv.accumulation = best, step_sequences // best
            lv.notes.append(
                f"micro-batches fused: {t.per_device_train_batch_size} x {step_sequences // t.per_device_train_batch_size}"
                f" -> {lv.batch_size} x {lv.accumulation}"
            )
    if lv.batch_size * lv.accumulation != step_sequences:
        lv.batch_size = t.per_device_train_batch_size
        lv.accumulation = step_sequences // lv.batch_size

    # Optimizer: torch's fused AdamW on CUDA for the fp32-state AdamW optimizers.
    lv.optim = t.optim if fused_optimizer_ok() else "adamw_torch"
    if t.fused_optimizer and t.optim in FUSABLE_OPTIMIZERS:
        if not fused_optimizer_ok():
            lv.notes.append("fused_optimizer skipped: no CUDA device (adamw_torch)")
        elif lv.activation_offloading:
            lv.notes.append(f"fused_optimizer skipped: memory-saving mode keeps {t.optim} (states paged)")
        else:
            lv.optim, lv.master_fp32 = "adamw_torch_fused", True
    # Dequantized base weights (first: their memory is no longer free for activations).
    copy_bytes = projection_weights(model_config) * (torch.finfo(dtype).bits // 8)
    free = free_memory_bytes()
    if t.dequantized_base == "auto":
        # off on a CPU (bitsandbytes' CPU path is not launch-bound), and in the memory-saving mode
        lv.dequantized_base = (free is not None and not lv.activation_offloading
                               and copy_bytes < DEQUANTIZED_BASE_SHARE * free)
        if free is not None:
            lv.notes.append(
                f"dequantized_base auto -> {lv.dequantized_base} ({copy_bytes / 2**30:.1f} GiB of 16-bit base "
                f"weights, free {free / 2**30:.1f} GiB{', memory-saving mode' if lv.activation_offloading else ''})"
            )
    else:
        lv.dequantized_base = bool(t.dequantized_base)
    if lv.dequantized_base and free is not None:
        free -= copy_bytes

    # Tokens in one micro-batch at most.
    tokens = lv.batch_size * per_sequence
    if t.gradient_checkpointing == "auto":
        need = activation_bytes(model_config, tokens, dtype)
        if free is None:
            # CPU: memory is the host's; the tiny and small models this runs on fit, so skip the recompute.
            lv.gradient_checkpointing = need > 4 * 2**30
        else:
            lv.gradient_checkpointing = need > FREE_MEMORY_SHARE * free
        lv.notes.append(
            f"gradient_checkpointing auto -> {lv.gradient_checkpointing} (estimated activations "
            f"{need / 2**30:.1f} GiB for {tokens} tokens, free "
            f"{'n/a' if free is None else f'{free / 2**30:.1f} GiB'})"
        )
    else:
        lv.gradient_checkpointing = bool(t.gradient_checkpointing)

    if t.varlen_attention and lv.padding_free:
        from tinyllama_mcp.pipeline import varlen_attention

        why_not = varlen_attention.unavailable(torch.cuda.is_available())
        if getattr(model_config, "attention_dropout", 0.0):
            why_not = "the model has attention dropout (the varlen kernel has none)"
        lv.varlen_attention = why_not is None
        if why_not:
            lv.notes.append(f"varlen_attention skipped: {why_not}")

    if t.torch_compile:
        why_not = compile_skipped(t, lv, model_config, stage, rows, mean_tokens)
        lv.torch_compile = why_not is None
        if why_not:
            lv.notes.append(f"torch_compile skipped: {why_not}")

    if t.cuda_graphs and lv.torch_compile:  # (they replay the compiled layers: nothing to say without them)
        why_not = graphs_skipped(t, lv, stage, rows, mean_tokens, row_lengths)
        lv.cuda_graphs = why_not is None
        if why_not:
            lv.notes.append(f"cuda_graphs skipped: {why_not}")

    if t.sync_free_step:  # the SFT loss over positions the packing collator lists (pipeline.sft_loss)
        if stage != "sft" or not lv.padding_free:
            if t.sync_free_step is True:
                lv.notes.append("sync_free_step skipped: it is SFT's, on packed batches (padding_free)")
        else:
            lv.sync_free_step = t.sync_free_step is True or lv.cuda_graphs

    if t.dataloader_workers == "auto":
        # where the host's collation delays the GPU: DPO's step, and SFT's once the GPU sets the pace (graphs)
        busy_gpu = stage == "dpo" or lv.cuda_graphs
        lv.dataloader_workers = AUTO_DATALOADER_WORKERS if torch.cuda.is_available() and busy_gpu else 0
    else:
        lv.dataloader_workers = t.dataloader_workers

    if t.use_liger_kernel:
        why_not = liger_available()
        if why_not is None:
            lv.use_liger_kernel = True
            # 'auto': without checkpointing Liger's SwiGLU and RMSNorm cost more host time than they save
            lv.liger_all = t.use_liger_kernel is True or lv.gradient_checkpointing
            if t.use_liger_kernel == "auto" and lv.torch_compile and not lv.liger_all:
                # the compiled layers compute RoPE themselves: Liger's would only add its Triton compiles
                lv.use_liger_kernel = False
                lv.notes.append("use_liger_kernel auto -> off (the compiled layers fuse RoPE)")
        else:
            lv.notes.append(f"use_liger_kernel skipped: {why_not}")

    if lv.activation_offloading and not torch.cuda.is_available():
        lv.activation_offloading = False
        lv.notes.append("activation_offloading skipped: no CUDA device")

    if stage == "dpo":
        lv.share_prompt = bool(t.share_prompt and lv.varlen_attention)
        if t.share_prompt and not lv.varlen_attention:
            lv.notes.append("share_prompt skipped: it runs on packed pairs (padding_free with varlen_attention)")
        if t.precompute_ref_log_probs == "auto":
            # The precomputed pass runs the reference once per row, in batches 4x the step's and without the
            # adapter switches: it pays when the run trains every row at least once (else it would pay for rows
            # never trained on). Measured on an H200: BENCHMARKS.md, round 13.
            lv.precompute_ref_log_probs = planned_rows(t, lv, rows) >= rows
        else:
            lv.precompute_ref_log_probs = bool(t.precompute_ref_log_probs)
    return lv


# ---------------------------------------------------------------- per-step Trainer overhead


def trim_trainer_overhead(trainer) -> None:
    """Take the Trainer's per-step walks over the whole module tree out of a step that is bound by Python.

    A peft-wrapped TinyLlama has ~1,800 modules and ~3,000 parameters; each step the Trainer walks them four
    times for work whose answer does not change while training (profile in BENCHMARKS.md, ~15% of a step):
    - `floating_point_ops` (its `total_flos` log) counts the non-embedding parameters: counted once here, the
      same 6 x tokens x parameters;
    - `model.train()` resets every module's mode: skipped when every module is already in that mode (then it
      changes nothing; transformers' own train() acts only on a change of mode);
    - `model.zero_grad()` and the gradient clipping visit every parameter: only the trainable ones, the only
      ones with gradients, are visited (the same norm, the same clipping).
    """
    model = trainer.model
    if not hasattr(model, "num_parameters"):
        return
    modules = list(model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    main_input = getattr(model, "main_input_name", "input_ids")
    parameters = model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(inputs) -> int:
        return 6 * inputs[main_input].numel() * parameters if main_input in inputs else 0

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

    def clip_grad_norm(_model):
        return trainer.accelerator.clip_grad_norm_(trainable, trainer.args.max_grad_norm)

    trainer.floating_point_ops = floating_point_ops
    trainer._clip_grad_norm = clip_grad_norm
    model.train, model.zero_grad = train, zero_grad


# ---------------------------------------------------------------- DPO: the reference pass's adapter switch


def quick_adapter_switch(model) -> bool:
    """Give this peft model a `disable_adapter` that switches its LoRA layers, listed once, off and on again.

    TRL runs DPO's reference pass inside peft's `model.disable_adapter()` every step. For LoRA that context walks the
    whole module tree three times (`get_model_status`, which also formats every module as text, then disabling and
    enabling every adapter layer): in the H200 profile of a DPO step it was the largest Python cost (BENCHMARKS.md,
    round 12). Here the same per-layer calls run (`enable_adapters(False)`, then `(True)`, which also sets the adapter
    weights' requires_grad as peft does) over the layers found once. Where peft's context does more (prompt
    learning, adaption prompts, trained biases, auxiliary training wrappers, adapter layers already off or mixed),
    peft's own runs. Only this model instance changes. Returns whether it was installed.
    """
    import contextlib

    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
        return False
    modules = list(model.modules())
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules):
        return False
    layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
    peft_switch = model.disable_adapter

    @contextlib.contextmanager
    def disable_adapter():
        config = model.peft_config[model.active_adapter]
        if (config.is_prompt_learning or config.is_adaption_prompt or getattr(config, "bias", "none") != "none"
                or not layers or any(layer.disable_adapters for layer in layers)):
            with peft_switch():
                yield
            return
        was_disabled = model._adapters_disabled
        for layer in layers:
            layer.enable_adapters(False)
        model._adapters_disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            model._adapters_disabled = was_disabled

    model.disable_adapter = disable_adapter
    return True


# ---------------------------------------------------------------- NF4 base weights dequantized once


def dequantize_base(model) -> int:
    """Give every bitsandbytes 4-bit linear a 16-bit copy of its weight, dequantized once, and a forward that
    multiplies with it. bitsandbytes' own training path dequantizes the weight to the input's dtype and calls
    F.linear, forward and backward, every time: the copy holds those same values, so outputs and gradients are
    unchanged while ~4 bitsandbytes calls (and their Python) per layer and step go away.

    The copy is a plain attribute, not a buffer: checkpoints, adapters and merges never see it; the NF4
    weights stay where they were. Returns the bytes the copies take (0: no 4-bit layers).
    """
    import bitsandbytes as bnb

    from tinyllama_mcp.pipeline.fused_lora import base_weight

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "dequantized_weight"):
            weight = base_weight(module, module.compute_dtype or module.weight.quant_state.dtype)
            module.dequantized_weight = weight
            module.forward = _dequantized_forward.__get__(module)  # this module only
            total += weight.numel() * weight.element_size()
    return total


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


# ---------------------------------------------------------------- SFT: packed rows, no attention mask


def padded_width(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple` (0: unchanged)."""
    return -(-tokens // multiple) * multiple if multiple else tokens


def graph_attention_bound(segments: list[int], max_sequence: int, padding_most: int, width: int) -> int:
    """max_length_q/_k of a packed batch replayed as CUDA graphs: the longer of `max_sequence` (the stage's
    max_length; 0: unknown) and `padding_most` (the most a padding segment holds), or the width when that is
    smaller, unknown, or exceeded by a segment. Known before the run, it is the same int for most batches, so the
    graphs need no new int per batch; and the flash kernels launch a block per 128 tokens of it for every segment,
    so the width (up to ~10k tokens) would launch mostly blocks that find their segment ended and exit."""
    bound = max(max_sequence, padding_most)
    if not GRAPH_ATTENTION_BOUND or not max_sequence or max(segments, default=0) > bound:
        return width
    return min(bound, width)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: indices of sequences grouped into rows of at most `capacity` tokens.

    A sequence longer than `capacity` gets a row of its own (the data is truncated to max_length before).
    Within a row the original order is kept, so the result does not depend on ties.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


@dataclass
class PackedRowsCollator:
    """Collate SFT examples (`input_ids`, optional `labels`) into packed rows with restarting position_ids.

    Output: input_ids, labels (-100 on padding and on each sequence's first token, which must not be
    predicted from the previous sequence), position_ids; no attention_mask, so transformers derives the
    block-diagonal causal mask from position_ids. With `cu_seq_lens`, also the sequence boundaries of the
    flattened rows for variable-length attention (pipeline.varlen_attention): cu_seq_lens_q/_k (int32; a row's
    padding is a segment of its own) and max_length_q/_k (an int). With `loss_positions`, also the labelled
    positions and the real-token count that the sync-free loss takes from the CPU (pipeline.sft_loss).

    `width_multiple` (lever cuda_graphs): rows are padded to a multiple of it, and max_length_q/_k is a bound on
    every segment known before the run (graph_attention_bound): the longer of `max_sequence` (the stage's
    max_length) and the width multiple (a padding segment is shorter), so a batch's shapes and ints are the same
    for every batch of one width.
    """

    pad_token_id: int
    capacity: int
    cu_seq_lens: bool = False
    width_multiple: int = 0
    loss_positions: bool = False
    max_sequence: int = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) if e.get("labels") is not None else list(e["input_ids"]) for e in examples]
        rows = pack_rows([len(x) for x in ids], self.capacity)
        width = padded_width(max(sum(len(ids[i]) for i in row) for row in rows), self.width_multiple)
        out_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(rows), width), -100, dtype=torch.long)
        out_pos = torch.zeros((len(rows), width), dtype=torch.long)
        bounds = [0]
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(ids[i])
                out_ids[r, at : at + n] = torch.tensor(ids[i])
                out_labels[r, at : at + n] = torch.tensor(labels[i])
                out_labels[r, at] = -100
                out_pos[r, at : at + n] = torch.arange(n)
                at += n
                bounds.append(r * width + at)
            # Padding continues the last sequence's positions: one more "sequence" only if there is padding,
            # and its labels are -100 either way.
            out_pos[r, at:] = torch.arange(width - at) + (out_pos[r, at - 1] + 1 if at else 0)
            if at < width:
                bounds.append((r + 1) * width)
        batch = {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}
        if self.cu_seq_lens:
            cu = torch.tensor(bounds, dtype=torch.int32)
            segments = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            longest = max(segments)
            if self.width_multiple:
                longest = graph_attention_bound(segments, self.max_sequence, self.width_multiple, width)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if self.loss_positions:  # lever sync_free_step: what the loss and the token count need, from the CPU
            batch.update(sft_loss.loss_positions(out_labels))
            batch[sft_loss.REAL_TOKENS] = int((out_ids != self.pad_token_id).sum())  # the Trainer's own rule
        return batch


# ---------------------------------------------------------------- DPO: right padding without a mask


def drop_right_padding_mask(model) -> Any:
    """Forward pre-hook on the decoder: drop an attention mask that is only right padding.

    Under causal attention no real token sees a pad to its right, so the outputs at real tokens are
    unchanged; pads' outputs differ but carry no loss. Masks with holes or left padding are kept.
    Returns the hook handle (remove it before generating).
    """
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        if kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None:
            return None
        if bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool((mask[:, 0] == 1).all()):
            kwargs["attention_mask"] = None
            return args, kwargs
        return None

    return decoder_of(model).register_forward_pre_hook(hook, with_kwargs=True)


def decoder_of(model):
    """The decoder stack (e.g. LlamaModel) under a causal LM, peft-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "model", model)
