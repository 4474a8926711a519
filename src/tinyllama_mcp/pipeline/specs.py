"""Stage specifications: what a job asks the pipeline to do.

These are light pydantic models (no torch import) shared by the server, which validates
tool input with them and writes them to `JOB_DIR/spec.json`, and by `python -m tinyllama_mcp.pipeline
run JOB_DIR`, which reads them back. Defaults are the reference recipe written up in
docs/ai/FINE_TUNING_TINYLLAMA.md; every field carries bounds and a description.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.nn.llama import PROJECTIONS as LLAMA_PROJECTIONS

# The reference base model of the recipe, and the embedded model that needs no download.
REFERENCE_BASE_MODEL = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
TINY_DEMO = "tiny-demo"

REFERENCE_SFT_DATASET = "HuggingFaceH4/ultrachat_200k"
REFERENCE_SFT_SPLIT = "test_sft"
REFERENCE_SFT_ROWS = 3000
REFERENCE_DPO_DATASET = "argilla/distilabel-intel-orca-dpo-pairs"


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
Auto = Literal["auto"]


class SpeedSpec(_Spec):
    """The speed-ups: none changes what is learned per token; each can be switched off, and all off is the recipe as
    written (docs/speed.md says what each one does and what it measured). 'auto' is decided per stage and machine."""

    gradient_checkpointing: Union[bool, Auto] = Field(
        "auto", description="Recompute activations in the backward pass; 'auto': only when one micro-batch's "
        "estimated activations do not fit in free GPU memory.")
    padding_free: bool = Field(
        True, description="SFT: pack each micro-batch's sequences with no attention across them; DPO: drop the mask "
        "of right-padded rows (exact under causal attention).")
    max_tokens_per_batch: int = Field(
        16384, ge=0, le=10_000_000, description="Fuse an optimizer step's micro-batches into the largest one whose "
        "sequences x max_length (x2 for DPO) fit this budget: the same gradient, larger kernels; 0: off.")
    fused_optimizer: bool = Field(
        True, description="CUDA: paged_adamw_32bit and adamw_torch run as torch's fused AdamW with fp32 states and "
        "fp32 LoRA master weights (not in the memory-saving mode).")
    tokens_per_step: Union[int, Auto] = Field(
        0, description="Real tokens an optimizer step should hold: k x the recipe's sequences a step, max_steps and "
        "save_steps divided by k; 'auto': 24,576 on CUDA, 0 on a CPU; 0: off (the recipe's steps).")
    torch_compile: Union[bool, Auto] = Field(
        "auto", description="Each decoder layer's training forward, and DPO's reference pass, as one compiled "
        "function (packed batches, plain Llama); 'auto': on CUDA without checkpointing, for runs that repay the "
        "compile.")
    cuda_graphs: Union[bool, Auto] = Field(
        "auto", description="With torch_compile on CUDA: the compiled layers replayed as CUDA graphs, packed widths "
        "padded to a multiple; 'auto': for runs that repay one recording per packed width.")
    sync_free_step: Union[bool, Auto] = Field(
        "auto", description="SFT on packed batches: a step that never waits for the GPU (loss scored in chunks, the "
        "log written one step late, no per-step NaN check); 'auto': with cuda_graphs.")
    dequantized_base: Union[bool, Auto] = Field(
        "auto", description="The frozen NF4 base weights dequantized once and used as 16-bit copies (the same "
        "values); 'auto': on CUDA when they take under a quarter of free memory, not in the memory-saving mode.")
    use_liger_kernel: Union[bool, Auto] = Field(
        "auto", description="Liger's Triton kernels (CUDA); true: RoPE, SwiGLU and RMSNorm; 'auto': all three "
        "under gradient checkpointing, else RoPE alone, none with the compiled layers.")
    fused_lora: bool = Field(
        True, description="Each LoRA projection (base matmul, dropout, A, B, scaling) as one autograd function, "
        "projections of one input together.")
    varlen_attention: bool = Field(
        True, description="With padding_free: each micro-batch one packed row, attention variable-length over the "
        "sequence boundaries (each sequence's own causal attention).")
    activation_offloading: bool = Field(
        False, description="Saved activations offloaded to pinned CPU memory (CUDA); with gradient_checkpointing="
        "true, the memory-saving mode.")
    precompute_ref_log_probs: Union[bool, Auto] = Field(
        "auto", description="DPO: the reference log-probs computed once before training instead of in every step; "
        "'auto': when the run trains every row at least once.")
    dataloader_workers: Union[int, Auto] = Field(
        "auto", description="Processes that collate the next batches while the GPU trains; 'auto': 2 for DPO on "
        "CUDA and for SFT with cuda_graphs, else 0.")
    share_prompt: bool = Field(
        True, description="DPO on packed pairs: the prompt a pair's answers share runs through the model once, both "
        "answers attending to it (the same log-probs).")
    lean_steps: bool = Field(
        True, description="Skip the Trainer's per-step walks over every module and parameter where they change "
        "nothing, and switch DPO's reference adapter over its layers listed once.")

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


SPEED_FIELDS = frozenset(SpeedSpec.model_fields)


class TrainingSpec(_Spec):
    """The recipe's optimizer and schedule (field names follow transformers' TrainingArguments), and its speed-ups."""

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
    seed: int = Field(42, ge=0, le=2**32 - 1)
    logging_steps: int = Field(1, ge=1, le=100_000)
    save_steps: int = Field(50, ge=1, le=10_000_000, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int = Field(2, ge=1, le=100, description="Keep this many newest checkpoints.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Hold out this fraction of the rows as validation data, scored at every "
        "checkpoint and at the end (0: none; or give the stage a validation_dataset)."
    )
    speed: SpeedSpec = Field(default_factory=SpeedSpec, description="The speed-ups (none changes what is learned).")

    @model_validator(mode="before")
    @classmethod
    def _speed_fields_of_older_specs(cls, data):
        """spec.json files written before the speed-ups had their own model keep them beside the recipe's fields."""
        if isinstance(data, dict) and SPEED_FIELDS & data.keys():
            data = dict(data)
            speed = {name: data.pop(name) for name in SPEED_FIELDS & data.keys()}
            nested = data.get("speed") or {}
            data["speed"] = {**(nested.model_dump() if isinstance(nested, SpeedSpec) else nested), **speed}
        return data


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


def _validation_field():
    return Field(None, description="Held-out rows in the training data's format, scored at every checkpoint and at "
                 "the end (pipeline.recipe.validation); or training.eval_fraction, not both.")


def _one_validation_source(spec):
    if spec.validation_dataset is not None and spec.training.eval_fraction > 0:
        raise ValueError("give validation_dataset or training.eval_fraction, not both: the validation rows come "
                         "either from their own file or held out of the training data")
    return spec


class SFTSpec(_StageSpec):
    stage: Literal["sft"] = "sft"
    dataset: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(
            source=REFERENCE_SFT_DATASET, split=REFERENCE_SFT_SPLIT, shuffle_seed=42, max_samples=REFERENCE_SFT_ROWS
        )
    )
    validation_dataset: Optional[DatasetSpec] = _validation_field()
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval_prompts: EvalPromptsSpec = Field(default_factory=EvalPromptsSpec)

    _one_validation_source = model_validator(mode="after")(_one_validation_source)


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
    validation_dataset: Optional[DatasetSpec] = _validation_field()
    beta: float = Field(0.1, gt=0, le=100, description="DPO temperature: how far the policy may move from the reference.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    training: TrainingSpec = Field(default_factory=_dpo_training_defaults)
    eval_prompts: EvalPromptsSpec = Field(default_factory=EvalPromptsSpec)

    _one_validation_source = model_validator(mode="after")(_one_validation_source)


class MergeSpec(_StageSpec):
    stage: Literal["merge"] = "merge"
    sft_adapter: str = Field(min_length=1, max_length=4096, description="Folder of the SFT LoRA adapter.")
    dpo_adapter: Optional[str] = Field(None, max_length=4096, description="Folder of the DPO adapter, if any.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights dtype of the merged checkpoint; 'auto': bf16 where supported, else fp16."
    )


EvalPrompt = Annotated[str, Field(min_length=1, max_length=1_000_000)]
LmEvalTask = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]


class EvaluateSpec(_StageSpec):
    """Measure one servable model on held-out data (pipeline/evaluation): each input given adds its metrics."""

    stage: Literal["evaluate"] = "evaluate"
    model: str = Field(min_length=1, max_length=4096, description="What generate loads: a merged or adapter folder, "
                       "'tiny-demo', a hub id or a local checkpoint.")
    model_label: str = Field(min_length=1, max_length=512, description="How results name the model (job id, alias).")
    chat_dataset: Optional[DatasetSpec] = Field(
        None, description="Chat rows (the SFT layout): loss, perplexity and token accuracy on assistant tokens.")
    preference_dataset: Optional[DatasetSpec] = Field(
        None, description="Preference pairs (the DPO layout): preference accuracy and mean log-prob margin.")
    prompts: list[EvalPrompt] = Field(
        default_factory=list, max_length=1000, description="User prompts answered greedily into generations.jsonl.")
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="Most tokens generated per prompt.")
    lm_eval_tasks: list[LmEvalTask] = Field(
        default_factory=list, max_length=64, description="lm-evaluation-harness tasks defined in lm_eval_task_dir.")
    lm_eval_task_dir: Optional[str] = Field(None, max_length=4096, description="Folder of local lm-eval task files.")
    lm_eval_sha256: Optional[str] = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Expected digest of the task files and their data; checked first.")
    lm_eval_limit: Optional[int] = Field(None, ge=1, le=10_000_000, description="At most this many documents a task.")
    max_length: int = Field(512, ge=16, le=131_072, description="Tokens per scored sequence; longer ones are cut "
                            "at the end (chat) or as DPO cuts them (pairs).")
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per scoring forward pass.")

    @model_validator(mode="after")
    def _something_to_measure(self) -> "EvaluateSpec":
        if not (self.chat_dataset or self.preference_dataset or self.prompts or self.lm_eval_tasks):
            raise ValueError("give chat_dataset, preference_dataset, prompts or lm_eval_tasks: nothing to evaluate")
        if bool(self.lm_eval_tasks) != bool(self.lm_eval_task_dir):
            raise ValueError("lm_eval_tasks and lm_eval_task_dir go together: name the tasks and their folder")
        return self

    def evaluation_key(self) -> str:
        """What the evaluation measures and on what (the model included, not how results name it): equal keys,
        equal results (greedy generation, hashed data)."""
        return self.model_dump_json(exclude={"model_label", "parents", "base_model"})


# What export writes: GGUF models for llama.cpp/Ollama, a GGUF LoRA, an Ollama Modelfile, a PEFT adapter for vLLM,
# a merged safetensors checkpoint. The adapter formats need an SFT/DPO adapter as the model.
EXPORT_FORMATS = ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-lora", "ollama", "peft", "safetensors")
ADAPTER_FORMATS = frozenset({"gguf-lora", "peft"})
GGUF_MODEL_FORMATS = ("gguf-f16", "gguf-bf16", "gguf-q8_0")
ExportFormat = Literal["gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-lora", "ollama", "peft", "safetensors"]


def default_export_formats(is_adapter: bool) -> list[str]:
    """What export writes when the call names no formats: every loader covered, bf16 left out (f16 serves it)."""
    formats = ["gguf-f16", "gguf-q8_0", "ollama", "safetensors"]
    return formats + ["gguf-lora", "peft"] if is_adapter else formats


def export_formats(formats: Optional[list[str]], is_adapter: bool, label: str) -> list[str]:
    """The formats an export writes (in EXPORT_FORMATS order); UserError for an adapter format of a whole model."""
    chosen = list(formats or default_export_formats(is_adapter))
    if not is_adapter and ADAPTER_FORMATS & set(chosen):
        raise UserError(f"{sorted(ADAPTER_FORMATS & set(chosen))} export a LoRA adapter, and {label} is a whole model "
                        "with none; export an SFT or DPO job for those, or leave them out of formats")
    return sorted(chosen, key=EXPORT_FORMATS.index)


class ExportSpec(_StageSpec):
    """Write one servable model in formats other tools load, each verified against the source (pipeline/export)."""

    stage: Literal["export"] = "export"
    model: str = Field(min_length=1, max_length=4096, description="What generate loads: a merged or adapter folder, "
                       "'tiny-demo', a hub id or a local checkpoint.")
    model_label: str = Field(min_length=1, max_length=512, description="How results name the model (job id, alias).")
    formats: Optional[list[ExportFormat]] = Field(
        None, min_length=1, max_length=len(EXPORT_FORMATS),
        description="What to write; None: default_export_formats for the model's kind.")
    file_stem: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                           description="Name of the exported files before their suffix (model-f16.gguf, ...).")

    @field_validator("formats")
    @classmethod
    def _formats_once(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("formats lists a format twice; list each once")
        if value is not None and "ollama" in value and not set(GGUF_MODEL_FORMATS) & set(value):
            raise ValueError("the Ollama Modelfile points at a GGUF model: add gguf-f16, gguf-bf16 or gguf-q8_0")
        return value


class GenerationSpec(_Spec):
    """Generation settings in the HF_GENERATE_KWARGS style (names follow transformers' generate)."""

    max_new_tokens: int = Field(512, ge=0, le=32_768, description="0: score the prompt only (prompt_logprobs).")
    temperature: float = Field(0.2, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    do_sample: Optional[bool] = Field(None, description="None: sample when temperature > 0.")
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings (EOS always stops).")
    logprobs: Optional[int] = Field(
        None, ge=0, le=20, description="Return each generated token's log-probability and this many alternatives.",
    )
    prompt_logprobs: Optional[int] = Field(
        None, ge=0, le=20, description="Return each prompt token's log-probability given the tokens before it.",
    )
    grammar: Optional[str] = Field(
        None, max_length=1_000_000,
        description="A llguidance grammar (pipeline.grammars) the output must match: constrained decoding.",
    )

    @property
    def sampling(self) -> bool:
        return self.do_sample if self.do_sample is not None else self.temperature > 0

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> "GenerationSpec":
        if self.do_sample and self.temperature == 0:
            raise ValueError("do_sample=true needs temperature > 0; use temperature 0 (or do_sample=false) for greedy")
        return self


StageSpec = Annotated[Union[SFTSpec, DPOSpec, MergeSpec, EvaluateSpec, ExportSpec], Field(discriminator="stage")]
STAGE_SPEC = TypeAdapter(StageSpec)


def parse_stage_spec(text: str) -> SFTSpec | DPOSpec | MergeSpec | EvaluateSpec | ExportSpec:
    """Parse spec.json text into the right stage spec (raises pydantic.ValidationError)."""
    return STAGE_SPEC.validate_json(text)
