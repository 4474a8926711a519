"""A model's lineage as pydantic models: the models://{ref} JSON, its compact form in status and /v1/models.

Dataset sha256 -> SFT -> DPO -> merge (the steps, oldest first) -> evaluations -> export files -> alias moves.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field


class DatasetRecord(BaseModel):
    job_id: str = Field(description="The job that trained on it.")
    stage: str
    source: Optional[str] = None
    sha256: Optional[str] = Field(None, description="Of the local file the job trained on (None: a hub dataset).")
    rows: Optional[int] = None
    layout: Optional[str] = None


class LineageSummary(BaseModel):
    """The compact lineage: where the chain starts, its jobs, the data each trained on."""

    root: str = Field(description="The base model at the start of the chain.")
    chain: list[str] = Field(description="Job ids oldest first, ending with this one (empty for a base model).")
    datasets: list[DatasetRecord] = Field(default_factory=list)


class LineageStep(BaseModel):
    job_id: str
    stage: str
    state: str = Field(description="The job's state; 'missing' when its row is gone from the store.")
    output_name: Optional[str] = None
    base_model: Optional[str] = None
    base_model_resolved: Optional[str] = Field(None, description="From lineage.json: what the job really loaded.")
    parents: list[str] = Field(default_factory=list)
    datasets: list[DatasetRecord] = Field(default_factory=list)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="The spec's recipe fields.")
    effective: Optional[dict[str, Any]] = Field(None, description="From lineage.json: device, dtype, levers.")
    libraries: Optional[dict[str, str]] = Field(None, description="From lineage.json: library versions.")
    created_at: Optional[str] = None
    finished_at: Optional[str] = None
    lineage_file: Optional[str] = None


class EvaluationRecord(BaseModel):
    job_id: str
    state: str
    finished_at: Optional[str] = None
    model: Optional[str] = Field(None, description="How the evaluation named the model (job id, alias).")
    metrics: Optional[dict[str, Any]] = Field(None, description="evaluation/metrics.json's metrics (succeeded only).")
    datasets: list[Any] = Field(default_factory=list)


class ExportFile(BaseModel):
    format: Optional[str] = None
    path: Optional[str] = None
    bytes: Optional[int] = None
    sha256: Optional[str] = None
    verification: dict[str, Any] = Field(default_factory=dict)


class ExportRecord(BaseModel):
    job_id: str
    state: str
    finished_at: Optional[str] = None
    files: list[ExportFile] = Field(default_factory=list)


class AliasMoveView(BaseModel):
    alias: str
    target: str
    previous: Optional[str] = Field(None, description="Where the alias pointed before (None: it was made).")
    action: str = Field(description="'promote' or 'rollback'.")
    at: str
    reason: Optional[str] = None
    by: Optional[str] = Field(None, description="The MCP client that moved it, as it names itself.")


class ModelLineage(BaseModel):
    """models://{ref}: one model's lineage end to end."""

    model: str = Field(description="The reference asked for (job id, output_name, alias, 'tiny-demo').")
    target: str = Field(description="What it resolved to: a job id or a base model.")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at it now.")
    summary: LineageSummary
    steps: list[LineageStep] = Field(default_factory=list, description="Oldest first.")
    evaluations: list[EvaluationRecord] = Field(default_factory=list, description="Newest first.")
    exports: list[ExportRecord] = Field(default_factory=list, description="Newest first.")
    alias_history: list[AliasMoveView] = Field(default_factory=list, description="Moves onto or off it, oldest first.")
