"""Inputs and outputs of evaluate, compare, compare_results and judge (pydantic; tools/list publishes the schemas).

Inputs forbid unknown fields like every tool input. Descriptions are written for an agent choosing arguments.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from tinyllama_mcp.pipeline.data import Preflight
from tinyllama_mcp.server.models import StartJobOutput, ToolInput

COMPARISON_ID_PATTERN = r"^cmp-[0-9a-f]{16}$"
PAIR_ID_PATTERN = r"^pair-[0-9a-f]{12}$"
MAX_MODELS = 8
MAX_PROMPTS = 1000


class _EvaluationArgs(ToolInput):
    """What to measure; shared by evaluate and compare. Give at least one of the four inputs."""

    chat_dataset: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Held-out chat rows (`messages`, the start_sft layout): a local file inside the server's data "
        "folders or a hub name. Measures chat_loss (mean over assistant tokens), chat_perplexity, chat_token_accuracy.",
    )
    preference_dataset: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="Held-out preference pairs (the start_dpo layout). Measures preference_accuracy (share of pairs "
        "whose chosen answer has the higher summed log-prob) and preference_margin (mean chosen minus rejected, nats).",
    )
    dataset_split: Optional[str] = Field(None, min_length=1, max_length=128,
                                         description="Split of hub datasets (default 'train'); ignored for local files.")
    prompts: Optional[list[str]] = Field(
        None, min_length=1, max_length=MAX_PROMPTS,
        description="User prompts answered greedily (one user turn each); compare pairs the answers for judging.",
    )
    lm_eval_tasks: Optional[list[str]] = Field(
        None, min_length=1, max_length=64,
        description="lm-evaluation-harness task names defined by the YAML files in lm_eval_task_dir.",
    )
    lm_eval_task_dir: Optional[str] = Field(
        None, min_length=1, max_length=4096,
        description="A folder inside the server's data folders holding local lm-eval task files (YAML and their "
        "local data files; no Python code, no hub datasets).",
    )
    max_samples: Optional[int] = Field(None, ge=1, le=10_000_000,
                                       description="At most this many rows of each dataset and documents of each task.")
    max_new_tokens: Optional[int] = Field(None, ge=1, le=32_768, description="Tokens generated per prompt (default 128).")
    max_length: Optional[int] = Field(None, ge=16, le=131_072,
                                      description="Tokens per scored sequence; longer ones are cut (default 512).")


class EvaluateInput(_EvaluationArgs):
    model: str = Field(
        ..., min_length=1, max_length=4096,
        description="The model to measure: a finished SFT/DPO job (adapter applied) or merge job, its output_name, "
        "'tiny-demo', a hub id or a local model folder.",
    )


class EvaluateOutput(StartJobOutput):
    preflights: dict[str, Preflight] = Field(
        default_factory=dict, description="What checking each dataset found, by kind ('chat', 'preference').")


class CompareInput(_EvaluationArgs):
    models: list[str] = Field(
        ..., max_length=MAX_MODELS,
        description="Two or more models (as evaluate's model). The first is the baseline: with more than two, each "
        "other model is paired with it.",
    )

    @field_validator("models")
    @classmethod
    def _two_or_more(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError("compare needs at least two models (the first is the baseline); to measure one model "
                             "call evaluate")
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice; list each model once")
        if any(not 1 <= len(ref) <= 4096 for ref in value):
            raise ValueError("each model must be 1 to 4096 characters")
        return value


class ComparedModel(BaseModel):
    model: str = Field(description="The model as resolved (job id, name, path).")
    job_id: str = Field(description="Its evaluate job.")
    state: str
    reused: bool = Field(False, description="True: an earlier evaluate job with the same evaluation was reused.")
    error: Optional[str] = None


class CompareOutput(BaseModel):
    comparison_id: str
    models: list[ComparedModel]
    pairs: int = Field(description="Blinded answer pairs to judge once the jobs succeeded (prompts x challengers).")
    next_step: str


class CompareResultsInput(ToolInput):
    comparison_id: str = Field(..., pattern=COMPARISON_ID_PATTERN, description="What compare returned.")


class MetricRow(BaseModel):
    model: str
    job_id: str
    metrics: dict[str, Any] = Field(description="metrics.json's metrics: chat_loss, preference_accuracy, lm_eval, ...")


class BlindPair(BaseModel):
    pair_id: str
    prompt: str
    A: str = Field(description="One model's answer.")
    B: str = Field(description="The other model's answer.")


class CompareResultsOutput(BaseModel):
    comparison_id: str
    state: Literal["pending", "ready", "failed"] = Field(
        description="'pending': jobs still queued or running; 'ready': all succeeded; 'failed': one did not.")
    models: list[ComparedModel]
    table: list[MetricRow] = Field(default_factory=list, description="One row per model, the baseline first.")
    pairs: list[BlindPair] = Field(
        default_factory=list,
        description="Answers to the same prompt, models hidden: A and B in an order drawn per pair, pairs shuffled.")
    judged: int = Field(0, description="Pairs with a verdict so far.")
    next_step: str


class Verdict(ToolInput):
    pair_id: str = Field(..., pattern=PAIR_ID_PATTERN, description="A pair_id from compare_results.")
    winner: Literal["A", "B", "tie"] = Field(..., description="The better answer, or 'tie'.")


class JudgeInput(ToolInput):
    comparison_id: str = Field(..., pattern=COMPARISON_ID_PATTERN, description="What compare returned.")
    verdicts: list[Verdict] = Field(
        ..., min_length=1, max_length=MAX_PROMPTS * (MAX_MODELS - 1),
        description="One verdict per pair: which answer is better, or 'tie'. Judging a pair again replaces its verdict.",
    )


class ModelScore(BaseModel):
    model: str
    judged: int = Field(description="Judged pairs this model is in.")
    wins: int
    losses: int
    ties: int
    win_rate: Optional[float] = Field(description="(wins + ties / 2) / judged; None before any judged pair.")


class UnblindedPair(BaseModel):
    pair_id: str
    A: str = Field(description="The model that wrote answer A.")
    B: str = Field(description="The model that wrote answer B.")
    winner: Literal["A", "B", "tie"]
    winner_model: Optional[str] = Field(description="None for a tie.")


class JudgeOutput(BaseModel):
    comparison_id: str
    judged: int
    total_pairs: int
    scores: list[ModelScore] = Field(description="Win rate per model over its judged pairs, the baseline first.")
    unblinded: list[UnblindedPair] = Field(description="Judged pairs with their models revealed; unjudged stay hidden.")
    next_step: str
