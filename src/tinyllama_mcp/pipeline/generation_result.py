"""The one result of a generation call, from the engine or transformers' generate alike (no torch import:
the server builds its MCP answer from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GenerationResult:
    text: str  # decoded (special tokens skipped), cut at the first stop string
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # the call's wall time, as its caller measures it
    token_ids: list[int] = field(default_factory=list)  # generated ids; include the EOS id when EOS stopped them
    ttft_ms: Optional[float] = None  # submit -> first token (the engine's host view); None where not measured
