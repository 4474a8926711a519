"""Inputs and outputs of promote, rollback and aliases (the alias tools), as pydantic models."""

from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import AfterValidator, BaseModel, Field

from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.lineage_models import AliasMoveView
from tinyllama_mcp.server.models import ToolInput
from tinyllama_mcp.server.store import STAGES

ALIAS_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,39}$"
_ALIAS = re.compile(ALIAS_PATTERN)
_LOOKS_LIKE_JOB = re.compile(rf"^({'|'.join(STAGES)})-[0-9a-f]+$")


def check_alias_name(name: str) -> str:
    """The rules a new alias name follows that need no store (clashes with output_names are checked on promote)."""
    if not _ALIAS.match(name):
        raise ValueError(f"alias {name[:60]!r} is not a valid name: use 1-40 lower-case letters, digits, '.', '_' or "
                         "'-', starting with a letter or digit (e.g. 'production', 'candidate-2')")
    if _LOOKS_LIKE_JOB.match(name):
        raise ValueError(f"alias {name!r} looks like a job id; pick a name such as 'production' or 'candidate'")
    if name == TINY_DEMO:
        raise ValueError("alias 'tiny-demo' would hide the embedded model of that name; pick another name")
    return name


AliasName = Annotated[str, Field(max_length=40, json_schema_extra={"pattern": ALIAS_PATTERN}),
                      AfterValidator(check_alias_name)]


class PromoteInput(ToolInput):
    model: str = Field(
        ..., min_length=1, max_length=4096,
        description="What the alias points at: a succeeded SFT/DPO/merge job (id or output_name), 'tiny-demo', "
        "HF_LOCAL_MODEL_PATH's model, or another alias (its current target is taken).",
    )
    alias: AliasName = Field(..., description="The alias to move (made if new), e.g. 'production' or 'candidate'.")
    reason: Optional[str] = Field(None, max_length=500, description="Why, kept in the alias history.")


class RollbackInput(ToolInput):
    alias: AliasName = Field(..., description="The alias to move back to the target it had before its current one.")
    reason: Optional[str] = Field(None, max_length=500, description="Why, kept in the alias history.")


class AliasesInput(ToolInput):
    alias: Optional[AliasName] = Field(None, description="One alias; omit for all.")
    history: int = Field(5, ge=0, le=200, description="How many of each alias's latest moves to include.")


class AliasView(BaseModel):
    alias: str
    target: str = Field(description="A job id, 'tiny-demo' or HF_LOCAL_MODEL_PATH's model.")
    target_output_name: Optional[str] = None
    servable: bool = Field(description="False: the target failed or its artifacts are gone; generate answers why.")
    problem: Optional[str] = None
    updated_at: str
    rollback_to: Optional[str] = Field(None, description="Where rollback(alias) moves it now (None: nowhere).")
    history: list[AliasMoveView] = Field(default_factory=list, description="Latest moves, newest first.")


class AliasMoveOutput(BaseModel):
    alias: AliasView
    move: AliasMoveView
    next_step: str


class AliasesOutput(BaseModel):
    aliases: list[AliasView] = Field(default_factory=list, description="By name.")
