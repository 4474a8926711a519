"""The one result of a generation call, from the engine or transformers' generate alike (no torch import:
the server builds its MCP answer from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (log-softmax of its logits, before temperature or any
    grammar mask) and the `top` most likely tokens at that position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str  # decoded (special tokens skipped), cut at the first stop string
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # the call's wall time, as its caller measures it
    token_ids: list[int] = field(default_factory=list)  # generated ids; include the EOS id when EOS stopped them
    ttft_ms: Optional[float] = None  # submit -> first token (the engine's host view); None where not measured
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None  # one per token_ids entry, when spec.logprobs was set
    # one per prompt token, when spec.prompt_logprobs was set; the first is None (nothing precedes it)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
