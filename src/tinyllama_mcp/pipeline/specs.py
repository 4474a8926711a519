"""Stage specifications: what a job asks the pipeline to do.

These are light pydantic models (no torch import) shared by the server, which validates
tool input with them and writes them to `JOB_DIR/spec.json`, and by `python -m tinyllama_mcp.pipeline
run JOB_DIR`, which reads them back. Defaults are the reference recipe written up in
docs/ai/FINE_TUNING_TINYLLAMA.md; every field carries bounds and a description.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# The reference base model of the recipe, and the embedded model that needs no download.
REFERENCE_BASE_MODEL = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
TINY_DEMO = "tiny-demo"

REFERENCE_SFT_DATASET = "HuggingFaceH4/ultrachat_200k"
REFERENCE_SFT_SPLIT = "test_sft"
REFERENCE_SFT_ROWS = 3000
REFERENCE_DPO_DATASET = "argilla/distilabel-intel-orca-dpo-pairs"

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Spec(BaseModel):
    # Unknown fields are errors: a misspelt hyperparameter must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(_Spec):
    """Where training rows come from: a local .jsonl/.json/.parquet file or a hub dataset name."""

    source: str = Field(min_length=1, max_length=4096, description="Local file path or hub dataset name.")
    split: str = Field("train", min_length=1, max_length=128, description="Hub split (ignored for local files).")
    shuffle_seed: Optional[int] = Field(None, ge=0, description="Shuffle rows with this seed before taking max_samples.")
    max_samples: Optional[int] = Field(None, ge=1, le=10_000_000, description="Use at most this many rows.")
    sha256: Optional[str] = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of a local file; checked before training."
    )


class LoraSpec(_Spec):
    r: int = Field(64, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, le=4096, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1, max_length=64)

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(LLAMA_PROJECTIONS))
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {unknown}; choose from {list(LLAMA_PROJECTIONS)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("target_modules lists a module twice; list each projection once")
        return value


class QuantSpec(_Spec):
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="'nf4': 4-bit NormalFloat base (QLoRA); 'none': plain LoRA on a 16/32-bit base."
    )
    double_quant: bool = Field(True, description="Quantize the NF4 quantization constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU."
    )


MAX_DATALOADER_WORKERS = 16


class TrainingSpec(_Spec):
    """Optimizer and schedule; field names follow transformers' TrainingArguments."""

    per_device_train_batch_size: int = Field(2, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(4, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of the steps spent warming up.")
    num_train_epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, le=10_000_000, description="-1: run num_train_epochs; else stop here.")
    max_length: int = Field(512, ge=16, le=131_072, description="Tokens per example; longer rows are truncated.")
    optim: Literal["paged_adamw_32bit", "adamw_torch", "paged_adamw_8bit", "adamw_8bit"] = "paged_adamw_32bit"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0, le=1000)
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Recompute activations in the backward pass to save memory. 'auto': only when the estimated "
        "activations of one micro-batch do not fit in free GPU memory (speed lever, issue 4).",
    )
    # ---- speed levers (issue 4); each can be switched off, none changes what is learned per token
    padding_free: bool = Field(
        True,
        description="SFT: pack each micro-batch's sequences into rows with restarting position_ids and no "
        "attention mask (no attention across sequences, far fewer pad tokens). DPO: drop the mask of "
        "right-padded batches (exact under causal attention), so attention takes the flash kernel.",
    )
    max_tokens_per_batch: int = Field(
        16384, ge=0, le=10_000_000,
        description="Fuse the gradient-accumulation micro-batches of one optimizer step into the largest "
        "micro-batch (dividing the step's sequences) whose sequences x max_length (x2 for DPO) fit this budget; "
        "all in one forward when the whole step fits: the same sequences per step, the same gradient, fewer "
        "and larger kernels. 0: off.",
    )
    fused_optimizer: bool = Field(
        True,
        description="CUDA: run paged_adamw_32bit / adamw_torch as torch's fused AdamW (adamw_torch_fused) with fp32 "
        "states and fp32 LoRA master weights (compute stays bf16/fp16 under autocast): the same AdamW math in a "
        "few kernels instead of one paged bitsandbytes launch per tensor (~300 a step of a CPU-bound step; "
        "BENCHMARKS.md). Kept off in the memory-saving mode (activation_offloading=true), whose optimizer states "
        "stay paged. 8-bit optimizers are left as they are. On a CPU the optimizer is adamw_torch either way.",
    )
    tokens_per_step: Union[int, Literal["auto"]] = Field(
        0,
        description="Off (0) by default: it changes the recipe's sequences per step, and on an H200 it made the "
        "SFT stage no faster (BENCHMARKS.md). Real (non-pad) tokens one optimizer step should hold: the recipe's "
        "sequences per step (batch x accumulation) are multiplied by "
        "k = round(tokens_per_step / (sequences x mean tokens)), "
        "max_steps and save_steps are divided by k (same sequences trained), cosine over the fewer steps, "
        "same warmup fraction, same peak learning rate. 'auto': 24576 on CUDA, 0 on a CPU. 0: off.",
    )
    torch_compile: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Run each decoder layer's training forward (norms, RoPE, attention, SwiGLU and the seven LoRA "
        "projections) as one torch.compile'd function shared by all layers (pipeline.compiled_layers), and DPO's "
        "reference pass (the adapter off) as its own inference graph: far fewer kernel launches in a step bound by "
        "them; with sync_free_step, SFT's chunked loss is compiled too. Needs packed batches (padding_free with varlen_attention) and a Llama-shaped model; the first step pays the compile (15-20 s on an H200). 'auto': on with CUDA, without "
        "gradient checkpointing, for runs of at least 3M real tokens (where the compile pays back); false: HF's "
        "eager layers.",
    )
    cuda_graphs: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="With torch_compile on CUDA: replay the compiled layers' forward and backward as CUDA graphs "
        "(inductor's CUDA graph trees), so a step's layers cost a few graph launches of host time instead of "
        "~2,500 kernel launches (H200, steps without recordings, same process: SFT 49.5k -> 55.9k tokens/s, DPO "
        "61k -> 71k). A graph is recorded per packed width, so packed widths are padded (a segment of pad tokens "
        "without loss) up to a "
        "multiple of 1,024 tokens, and each width's first steps record it (~3 s each; ~8 widths for SFT's chat data, "
        "~11 width pairs for DPO). Not under gradient checkpointing. 'auto': SFT runs of at least 2.5M real tokens "
        "for each packed width their rows meet (chat rows ~12 widths, so ~30M; rows that fill max_length one), DPO "
        "runs of at least 24M, where the recordings pay back (BENCHMARKS.md, rounds 14 and 17). With it, SFT's "
        "sync_free_step and "
        "dataloader_workers 'auto' are on. true: wherever it applies; false: off.",
    )
    sync_free_step: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="SFT with padding_free: a step that never waits for the GPU. The collator lists "
        "the labelled positions and counts the real tokens on the CPU, the loss scores those positions through the "
        "LM head in chunks (TRL's loss, entropy and token accuracy, the metrics read at the log), batches are "
        "copied from pinned memory without blocking, the per-step NaN check of the loss is off (a NaN loss is "
        "logged as NaN), and a step's log is written at the next step's end from a copy the GPU made (a "
        "checkpoint's step and the last log at once). It pays where the GPU sets the pace: with cuda_graphs "
        "(BENCHMARKS.md, rounds 14 and 15). 'auto': "
        "on with cuda_graphs; true: on wherever the batch is packed; false: TRL's loss.",
    )
    dequantized_base: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Dequantize the frozen NF4 base weights once and multiply with those 16-bit copies, instead of "
        "bitsandbytes dequantizing every weight in every forward and backward: the same values (bitsandbytes "
        "computes exactly these copies each call), so the same QLoRA model and gradients, for ~2 bytes a base "
        "weight of GPU memory (1.8 GiB for TinyLlama) and ~300 fewer dequantize calls a step (BENCHMARKS.md). "
        "'auto': on CUDA when the copies take under a quarter of free memory, never in the memory-saving mode "
        "(activation_offloading=true) nor on a CPU.",
    )
    use_liger_kernel: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Liger's fused Triton kernels for RoPE, SwiGLU and RMSNorm (CUDA only; skipped with a note on "
        "a CPU). true: all three. 'auto': all three with gradient checkpointing, where they keep the recompute's "
        "memory small; without it only RoPE: each Liger call costs ~0.2 ms of host time, and in this host-bound "
        "step transformers' own SwiGLU and RMSNorm ops cost less (BENCHMARKS.md). false: none.",
    )
    fused_lora: bool = Field(
        True,
        description="Run each LoRA projection (base matmul, dropout, A, B, scaling) as one autograd function with a "
        "hand-written backward instead of peft's chain of modules: the same math and dropout draws, a fraction of "
        "the Python and kernel launches of a step that is bound by them (pipeline/fused_lora.py).",
    )
    varlen_attention: bool = Field(
        True,
        description="With padding_free: one packed row per micro-batch and variable-length flash attention over "
        "the sequence boundaries (each sequence's own causal attention, exactly). SFT: instead of rows of max_length "
        "with a block-diagonal mask through sdpa; DPO: instead of TRL's rows padded to the longest, so no padding "
        "is computed. CUDA kernel from torch >= 2.10; on a CPU each sequence runs through causal sdpa on its own.",
    )
    activation_offloading: bool = Field(
        False,
        description="Offload saved activations to pinned CPU memory (TRL); with gradient_checkpointing=true this "
        "is the memory-saving mode. CUDA only.",
    )
    precompute_ref_log_probs: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="DPO: compute the reference log-probs once before training (on the prepared model, in batches "
        "4x the step's) instead of a reference forward every step. 'auto': when the run trains every row at least "
        "once (else it would pay for rows never seen).",
    )
    dataloader_workers: Union[int, Literal["auto"]] = Field(
        "auto",
        description="Worker processes that read and collate the next batches while the GPU trains on this one "
        "(tokenized rows to packed tensors), and DPO's precomputed reference pass: data preparation off the step's "
        "critical path. 'auto': 2 for DPO on "
        "CUDA (its preference batches take the longest to collate) and for SFT with cuda_graphs (where the GPU sets "
        "the pace), else 0 (SFT's host-bound step measured no faster; on a CPU the step itself is the CPU's work). "
        "0: collate in the training process.",
    )
    share_prompt: bool = Field(
        True,
        description="DPO, with padding_free and varlen_attention: the tokens a pair's chosen and rejected rows begin "
        "with (the prompt) run through the model once, and both answers attend to them; the same log-probs "
        "(causal attention: a prompt token never sees the answer), fewer tokens computed.",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1)

    @field_validator("tokens_per_step")
    @classmethod
    def _tokens_per_step_range(cls, value):
        if value != "auto" and not 0 <= value <= 10_000_000:
            raise ValueError("tokens_per_step must be 'auto' or an integer from 0 (off) to 10,000,000")
        return value

    @field_validator("dataloader_workers")
    @classmethod
    def _dataloader_workers_range(cls, value):
        if value != "auto" and (isinstance(value, bool) or not 0 <= value <= MAX_DATALOADER_WORKERS):
            raise ValueError(f"dataloader_workers must be 'auto' or an integer from 0 (collate in the training "
                             f"process) to {MAX_DATALOADER_WORKERS}")
        return value
    logging_steps: int = Field(1, ge=1, le=100_000)
    save_steps: int = Field(50, ge=1, le=10_000_000, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int = Field(2, ge=1, le=100, description="Keep this many newest checkpoints.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Hold out this fraction of rows for an eval loss at the end (0: none)."
    )


class EvalPromptsSpec(_Spec):
    """A small fixed prompt set answered after training and saved as eval_samples.jsonl."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "Write a Python function that reverses a string.",
            "Explain in one sentence what a unit test is.",
        ],
        max_length=64,
    )
    max_new_tokens: int = Field(64, ge=1, le=4096)


class _StageSpec(_Spec):
    base_model: str = Field(
        REFERENCE_BASE_MODEL, min_length=1, max_length=4096,
        description="Local checkpoint path, hub id, or 'tiny-demo' for the embedded model.",
    )
    parents: list[str] = Field(default_factory=list, description="Ids of the jobs this one builds on (lineage).")


class SFTSpec(_StageSpec):
    stage: Literal["sft"] = "sft"
    dataset: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(
            source=REFERENCE_SFT_DATASET, split=REFERENCE_SFT_SPLIT, shuffle_seed=42, max_samples=REFERENCE_SFT_ROWS
        )
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval_prompts: EvalPromptsSpec = Field(default_factory=EvalPromptsSpec)


def _dpo_training_defaults() -> TrainingSpec:
    return TrainingSpec(learning_rate=1e-5, max_steps=200, warmup_ratio=0.1)


class DPOSpec(_StageSpec):
    stage: Literal["dpo"] = "dpo"
    sft_adapter: Optional[str] = Field(
        None, max_length=4096,
        description="Folder of the SFT LoRA adapter DPO builds on; it is merged into the base first and is "
        "also the reference model. None: DPO straight on the base model.",
    )
    dataset: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source=REFERENCE_DPO_DATASET))
    beta: float = Field(0.1, gt=0, le=100, description="DPO temperature: how far the policy may move from the reference.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    training: TrainingSpec = Field(default_factory=_dpo_training_defaults)
    eval_prompts: EvalPromptsSpec = Field(default_factory=EvalPromptsSpec)


class MergeSpec(_StageSpec):
    stage: Literal["merge"] = "merge"
    sft_adapter: str = Field(min_length=1, max_length=4096, description="Folder of the SFT LoRA adapter.")
    dpo_adapter: Optional[str] = Field(None, max_length=4096, description="Folder of the DPO adapter, if any.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype of the merged checkpoint; 'auto': bf16 where supported, else fp16."
    )


class GenerationSpec(_Spec):
    """Generation settings in the HF_GENERATE_KWARGS style (names follow transformers' generate)."""

    max_new_tokens: int = Field(512, ge=1, le=32_768)
    temperature: float = Field(0.2, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    do_sample: Optional[bool] = Field(None, description="None: sample when temperature > 0.")
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings (EOS always stops).")

    @property
    def sampling(self) -> bool:
        return self.do_sample if self.do_sample is not None else self.temperature > 0

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> "GenerationSpec":
        if self.do_sample and self.temperature == 0:
            raise ValueError("do_sample=true needs temperature > 0; use temperature 0 (or do_sample=false) for greedy")
        return self


StageSpec = Annotated[Union[SFTSpec, DPOSpec, MergeSpec], Field(discriminator="stage")]
STAGE_SPEC = TypeAdapter(StageSpec)


def parse_stage_spec(text: str) -> SFTSpec | DPOSpec | MergeSpec:
    """Parse spec.json text into the right stage spec (raises pydantic.ValidationError)."""
    return STAGE_SPEC.validate_json(text)
