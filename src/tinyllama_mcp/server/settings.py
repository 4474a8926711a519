"""The server's settings: one object, read from environment variables.

Names follow `TINYLLAMA_MCP_<FIELD>` (e.g. `TINYLLAMA_MCP_HOME`), except the three the fine-tuning
recipe names itself (`HF_LOCAL_MODEL_PATH`, `HF_GENERATE_KWARGS`, `PREFER_LLM_PROVIDER`), which are
read under exactly those names so that one environment serves the recipe's scripts and this server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tinyllama_mcp.pipeline.specs import REFERENCE_BASE_MODEL, GenerationSpec
from tinyllama_mcp.server.errors import describe_validation_error


def default_home() -> Path:
    """The per-user data folder (what platformdirs calls user_data_dir), without the dependency."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tinyllama-mcp"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TINYLLAMA_MCP_", extra="ignore", populate_by_name=True, validate_default=True
    )

    # --- where things live -------------------------------------------------------------------
    home: Path = Field(
        default_factory=default_home,
        description="Folder holding the job queue (queue.sqlite3), jobs/, data/ and cache/.",
    )
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Extra folders (os.pathsep-separated) that datasets and model paths may come from, "
        "besides the home's data/ folder and the server's working directory.",
    )

    # --- models ------------------------------------------------------------------------------
    base_model: str = Field(
        REFERENCE_BASE_MODEL, min_length=1,
        description="Base model when start_sft/start_dpo get none: a hub id, a local path, or 'tiny-demo'.",
    )
    hf_local_model_path: Optional[str] = Field(
        None, validation_alias=AliasChoices("HF_LOCAL_MODEL_PATH", "hf_local_model_path"),
        description="Model generate uses when the call names none (before the newest merged model).",
    )
    hf_generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("HF_GENERATE_KWARGS", "hf_generate_kwargs"),
        description='Default generation settings as JSON, e.g. {"max_new_tokens": 256, "temperature": 0.7}.',
    )
    prefer_llm_provider: Optional[str] = Field(
        None, validation_alias=AliasChoices("PREFER_LLM_PROVIDER", "prefer_llm_provider"),
        description="Provider the client side picks over an [agents.*] block's llm_provider.",
    )
    offline: Optional[bool] = Field(
        None, description="true: job processes get HF_HUB_OFFLINE=1 and friends; unset: inherit the environment.",
    )

    # --- HTTP ----------------------------------------------------------------------------------
    token: Optional[SecretStr] = Field(
        None, description="Bearer token HTTP/SSE clients must send; required for a non-loopback bind.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra host names (comma-separated) HTTP clients may use in Host/Origin, besides loopback "
        "and the bind address.",
    )

    # --- limits --------------------------------------------------------------------------------
    max_queued_jobs: int = Field(32, ge=1, le=10_000, description="start_* refuse new jobs beyond this many queued.")
    max_new_tokens: int = Field(1024, ge=1, le=32_768, description="Upper bound on generate's max_new_tokens.")
    max_prompt_chars: int = Field(
        16_000, ge=1, le=1_000_000,
        description="Upper bound on a generate prompt, in characters.",
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest HTTP request body accepted.")
    generation_queue: int = Field(
        256, ge=1, le=100_000,
        description="Generation requests per loaded model that may wait for a batch row; more are refused at once "
        "(/v1: 429, MCP generate: an error saying to retry).",
    )

    # --- worker --------------------------------------------------------------------------------
    worker: bool = Field(
        True,
        description="Run a worker inside each server process (false: only `tinyllama-mcp worker` runs jobs).",
    )
    worker_slots: Optional[int] = Field(
        None, ge=1, le=64, description="Jobs run at once (one per GPU); default: the visible GPUs, 1 without any.",
    )
    lease_ttl_s: float = Field(
        15.0, ge=1.0, le=3600,
        description="A worker that misses heartbeats this long is presumed dead.",
    )
    max_attempts: int = Field(3, ge=1, le=20, description="A job is tried this many times before it fails for good.")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="How often workers look for jobs and fold job events.")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return Path(os.path.expanduser(value)).absolute()

    @field_validator("data_roots")
    @classmethod
    def _expand_roots(cls, value: list[Path]) -> list[Path]:
        return [Path(os.path.expanduser(path)).absolute() for path in value]

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("hf_generate_kwargs")
    @classmethod
    def _valid_generate_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        # A typo here would otherwise surface on every generate call; fail at start-up instead.
        try:
            GenerationSpec(**value)
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            raise ValueError(f"HF_GENERATE_KWARGS is not valid generation settings ({problems})") from None
        return value

    # --- derived paths -------------------------------------------------------------------------
    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def cache_dir(self) -> Path:
        """TINYLLAMA_MCP_CACHE for the pipeline: where `tiny-demo` is created and cached."""
        return self.home / "cache"

    @property
    def db_path(self) -> Path:
        return self.home / "queue.sqlite3"

    def data_root_paths(self) -> list[Path]:
        """Folders datasets may be read from: the home's data/, the working directory, then the extras."""
        roots = [self.data_dir, Path.cwd(), *self.data_roots]
        return _unique_resolved(roots)

    def model_root_paths(self) -> list[Path]:
        """Folders model paths may point into: the data roots plus the jobs this server produced."""
        return _unique_resolved([*self.data_root_paths(), self.jobs_dir])

    def ensure_dirs(self) -> None:
        for folder in (self.home, self.jobs_dir, self.data_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def _unique_resolved(paths: list[Path]) -> list[Path]:
    seen: list[Path] = []
    for path in paths:
        resolved = Path(os.path.expanduser(path)).resolve()
        if resolved not in seen:
            seen.append(resolved)
    return seen


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad variable becomes one readable line instead of a traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise SystemExit(f"tinyllama-mcp: invalid configuration: {problems}") from None
