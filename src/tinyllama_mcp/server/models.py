"""Tool inputs and outputs as pydantic models: tools/list publishes their JSON schemas.

Inputs forbid unknown fields (a misspelt hyperparameter must not be silently ignored). Bounds mirror
pipeline.specs, which validates again when the stage spec is built. Descriptions are written for an
LLM agent choosing arguments.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tinyllama_mcp.pipeline.data import Preflight
from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS
from tinyllama_mcp.server.lineage_models import LineageSummary
from tinyllama_mcp.server.store import JOB_ID_PATTERN

JOB_ID_FIELD = dict(pattern=JOB_ID_PATTERN, max_length=21)  # "evaluate-" and 12 hex digits, the longest id
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ToolInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _TrainingArgs(ToolInput):
    """Hyperparameters shared by start_sft and start_dpo; unset fields keep the recipe's defaults."""

    dataset_split: Optional[str] = Field(
        None, min_length=1, max_length=128,
        description="Split of a hub dataset (default: the recipe's split). Ignored for local files.",
    )
    output_name: Optional[str] = Field(
        None, pattern=NAME_PATTERN,
        description="A unique, memorable name for this job's result; usable as generate's model.",
    )
    max_samples: Optional[int] = Field(
        None, ge=1, le=10_000_000,
        description="Use at most this many rows of the dataset.",
    )
    max_steps: Optional[int] = Field(
        None, ge=1, le=10_000_000,
        description="Stop after this many optimizer steps (overrides num_train_epochs).",
    )
    num_train_epochs: Optional[float] = Field(None, gt=0, le=1000, description="Passes over the dataset.")
    learning_rate: Optional[float] = Field(
        None, gt=0, le=1.0,
        description="Peak learning rate (recipe: 2e-4 for SFT, 1e-5 for DPO).",
    )
    lora_r: Optional[int] = Field(None, ge=1, le=1024, description="LoRA rank (recipe: 64).")
    lora_alpha: Optional[float] = Field(None, gt=0, le=4096, description="LoRA alpha; scale = alpha / r (recipe: 32).")
    lora_dropout: Optional[float] = Field(None, ge=0, lt=1, description="Dropout on the LoRA input (recipe: 0.1).")
    target_modules: Optional[list[Literal[LLAMA_PROJECTIONS]]] = Field(  # type: ignore[valid-type]
        None, min_length=1, max_length=7, description="Projections that get LoRA adapters (recipe: all seven).",
    )
    per_device_train_batch_size: Optional[int] = Field(
        None, ge=1, le=1024,
        description="Rows per forward pass (recipe: 2).",
    )
    gradient_accumulation_steps: Optional[int] = Field(
        None, ge=1, le=1024,
        description="Forward passes per optimizer step (recipe: 4).",
    )
    max_length: Optional[int] = Field(
        None, ge=16, le=131_072,
        description="Tokens per example; longer rows are truncated (recipe: 512).",
    )
    quantization: Optional[Literal["nf4", "none"]] = Field(
        None,
        description="'nf4': 4-bit QLoRA base (recipe, needs a CUDA GPU); 'none': plain LoRA.",
    )
    save_steps: Optional[int] = Field(
        None, ge=1, le=10_000_000,
        description="Checkpoint every this many steps; an interrupted job resumes from the newest.",
    )
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="Random seed.")
    validation_dataset: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Held-out data in the training data's format (a local file inside the server's data folders, or a "
        "hub name), checked like dataset and scored at every checkpoint and at the end: valid_loss and "
        "valid_mean_token_accuracy (SFT), valid_reward_accuracy and valid_reward_margin (DPO). Or eval_fraction.",
    )
    validation_split: Optional[str] = Field(
        None, min_length=1, max_length=128, description="Split of a hub validation_dataset (default 'train').",
    )
    eval_fraction: Optional[float] = Field(
        None, gt=0, lt=0.5,
        description="Instead of validation_dataset: hold out this fraction of the dataset's rows as validation data.",
    )

    @model_validator(mode="after")
    def _one_validation_source(self) -> "_TrainingArgs":
        if self.validation_dataset is not None and self.eval_fraction is not None:
            raise ValueError("give validation_dataset or eval_fraction, not both: validation rows come either from "
                             "their own file or held out of the dataset")
        if self.validation_split is not None and self.validation_dataset is None:
            raise ValueError("validation_split names a split of validation_dataset; give validation_dataset too")
        return self


class StartSFTInput(_TrainingArgs):
    dataset: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Chat data with a `messages` column: a local .jsonl/.json/.parquet path inside the server's "
        "data folders, or a hub dataset name. Default: the recipe's UltraChat 200k subset (needs network).",
    )
    base_model: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Model to fine-tune: a hub id, a local checkpoint folder, the id of a finished merge job, or "
        "'tiny-demo' (small embedded model, trains on a CPU in seconds). Default: the server's configured base model.",
    )


class StartDPOInput(_TrainingArgs):
    dataset: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Preference pairs (`system`/`input`/`chosen`/`rejected` or `prompt`/`chosen`/`rejected`): a local "
        "file inside the server's data folders or a hub dataset name. Default: the recipe's Orca DPO pairs "
        "(needs network).",
    )
    sft_job_id: Optional[str] = Field(
        None, **JOB_ID_FIELD,
        description="The SFT job to improve (it may still be queued or running; DPO then waits for it). Recommended.",
    )
    base_model: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Only without sft_job_id: run DPO straight on this base model (hub id, local folder, 'tiny-demo').",
    )
    beta: Optional[float] = Field(
        None, gt=0, le=100,
        description="DPO temperature: how far the model may move from the SFT model (recipe: 0.1).",
    )


class MergeInput(ToolInput):
    sft_job_id: Optional[str] = Field(
        None, **JOB_ID_FIELD,
        description="SFT job whose adapter is merged into its base model.",
    )
    dpo_job_id: Optional[str] = Field(
        None, **JOB_ID_FIELD,
        description="DPO job whose adapter is merged on top (its SFT job is found automatically if sft_job_id is "
        "omitted).",
    )
    output_name: Optional[str] = Field(
        None, pattern=NAME_PATTERN,
        description="Name for the merged model; generate accepts it as model.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights dtype; 'auto': bf16 where supported, else fp16.",
    )

    @model_validator(mode="after")
    def _needs_a_job(self) -> "MergeInput":
        if self.sft_job_id is None and self.dpo_job_id is None:
            raise ValueError("give sft_job_id, dpo_job_id or both: merge needs a trained adapter")
        return self


class StatusInput(ToolInput):
    job_id: Optional[str] = Field(
        None, **JOB_ID_FIELD,
        description="A job id for its full status; omit for recent jobs, the queue and the workers.",
    )
    limit: int = Field(10, ge=1, le=100, description="How many recent jobs to list (without job_id).")
    log_lines: int = Field(
        20, ge=0, le=200,
        description="How many last lines of the job's log to include (with job_id).",
    )


class CancelInput(ToolInput):
    job_id: str = Field(..., **JOB_ID_FIELD, description="The job to cancel.")


class ChatMessage(ToolInput):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=1_000_000)


class GenerateInput(ToolInput):
    prompt: Optional[str] = Field(
        None, min_length=1, max_length=1_000_000,
        description="A single user message (rendered with the chat template). Give this or messages.",
    )
    raw: bool = Field(False, description="Send prompt as plain text to continue, without the chat template.")
    messages: Optional[list[ChatMessage]] = Field(
        None, min_length=1, max_length=256,
        description="A chat as [{role, content}], rendered with the model's chat template.",
    )
    model: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="A job id (a finished SFT/DPO job is used with its adapter applied; a merge job as merged), a "
        "job's output_name, an alias (see promote), 'tiny-demo', a hub id, or a local model folder. Default: "
        "HF_LOCAL_MODEL_PATH, else the newest merged model, else 'tiny-demo'.",
    )
    max_new_tokens: Optional[int] = Field(
        None, ge=1, le=32_768,
        description="Most tokens to generate (default from HF_GENERATE_KWARGS).",
    )
    temperature: Optional[float] = Field(None, ge=0, le=5, description="0: greedy decoding.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    do_sample: Optional[bool] = Field(
        None,
        description="Sample (needs temperature > 0); default: sample when temperature > 0.",
    )
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="Seed for reproducible sampling.")
    stop: Optional[list[str]] = Field(None, max_length=16, description="Stop strings (EOS always stops).")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateInput":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.raw and self.prompt is None:
            raise ValueError("raw applies to prompt only; messages always use the chat template")
        return self


# --------------------------------------------------------------------------- outputs
class StartJobOutput(BaseModel):
    job_id: str
    stage: Literal["sft", "dpo", "merge", "evaluate", "export"]
    state: str
    queue_position: Optional[int] = Field(
        description="1: next to run. None once running or when waiting on a parent job.",
    )
    waiting_for: list[str] = Field(default_factory=list, description="Parent jobs that must succeed first.")
    base_model: str
    dataset: Optional[str] = None
    output_name: Optional[str] = None
    parents: list[str] = Field(default_factory=list)
    job_dir: str
    preflight: Optional[Preflight] = None
    validation_preflight: Optional[Preflight] = Field(None, description="The check of validation_dataset.")
    next_step: str = Field(description="What to call next.")


class Progress(BaseModel):
    step: Optional[int] = None
    total: Optional[int] = None
    percent: Optional[float] = None
    epoch: Optional[float] = None


class Metrics(BaseModel):
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    grad_norm: Optional[float] = None
    eval_loss: Optional[float] = None
    reward_accuracy: Optional[float] = Field(None, description="DPO: share of pairs where chosen beats rejected.")
    reward_margin: Optional[float] = None
    rewards_chosen: Optional[float] = None
    rewards_rejected: Optional[float] = None
    valid_loss: Optional[float] = Field(
        None, description="At the newest checkpoint, on a fixed sample of the validation rows (valid_rows of them); "
        "DPO: the sigmoid DPO loss.")
    valid_mean_token_accuracy: Optional[float] = Field(None, description="SFT: share of validation tokens predicted "
                                                       "exactly (top-1), at the newest checkpoint.")
    valid_reward_accuracy: Optional[float] = Field(None, description="DPO: share of validation pairs whose chosen "
                                                   "answer out-rewards the rejected one, at the newest checkpoint.")
    valid_reward_margin: Optional[float] = Field(None, description="DPO: mean chosen minus rejected reward of the "
                                                 "validation pairs, at the newest checkpoint.")
    valid_rows: Optional[int] = Field(None, description="Validation rows the valid_* figures score (at most 64).")
    full_valid_loss: Optional[float] = Field(None, description="After the last step, on every validation row.")
    full_valid_mean_token_accuracy: Optional[float] = None
    full_valid_reward_accuracy: Optional[float] = None
    full_valid_reward_margin: Optional[float] = None
    full_valid_rows: Optional[int] = None


class JobView(BaseModel):
    job_id: str
    stage: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    output_name: Optional[str] = None
    base_model: Optional[str] = None
    parents: list[str] = Field(default_factory=list)
    created_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    attempts: int
    max_attempts: int
    queue_position: Optional[int] = None
    progress: Optional[Progress] = None
    metrics: Optional[Metrics] = None
    tokens_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    summary: Optional[dict[str, Any]] = Field(
        None,
        description="Set when training ended: first/last loss, steps, runtime, ...",
    )
    artifacts: dict[str, str] = Field(
        default_factory=dict,
        description="kind -> path: adapter, merged, eval_samples, lineage.",
    )
    error: Optional[str] = None
    attempt_errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    job_dir: str
    log_tail: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at this job now.")
    lineage: Optional[LineageSummary] = Field(None, description="Base model, job chain and datasets (sha256); "
                                              "models://<job_id> has the full lineage.")
    best_checkpoint: Optional[dict[str, Any]] = Field(
        None, description="With validation: the checkpoint with the lowest valid_loss (SFT) or the highest "
        "valid_reward_accuracy, then valid_reward_margin (DPO) so far: step, path and its valid_* figures.")
    evaluation: Optional[dict[str, Any]] = Field(
        None, description="A succeeded evaluate job: its metrics.json metrics (chat_loss, chat_perplexity, "
        "chat_token_accuracy, preference_accuracy, preference_margin, lm_eval), whichever it measured.")


class WorkerView(BaseModel):
    slot: int
    device: str
    worker_pid: int
    host: str
    alive: bool = Field(description="False: heartbeats stopped; another worker will take over the slot.")
    job_id: Optional[str] = None


class StatusOutput(BaseModel):
    job: Optional[JobView] = Field(None, description="The job asked for (with job_id).")
    jobs: list[JobView] = Field(default_factory=list, description="Recent jobs, newest first (without job_id).")
    queue: list[str] = Field(default_factory=list, description="Queued job ids, next first.")
    workers: list[WorkerView] = Field(default_factory=list)
    devices: str = Field("", description="What this machine offers to training.")
    hint: str = ""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateOutput(BaseModel):
    text: str
    model: str = Field(description="The model that answered, as resolved.")
    finish_reason: str = Field(
        description="'stop': the model ended (EOS or a stop string); 'length': max_new_tokens was reached.",
    )
    usage: Usage
    latency_ms: float


class CancelOutput(BaseModel):
    job_id: str
    previous_state: str
    state: str
    cancel_requested: bool
    message: str
