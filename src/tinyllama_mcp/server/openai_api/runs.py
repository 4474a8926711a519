"""Running a request's choices on the shared generator cache: each choice is one engine request, all submitted at
once so that they batch with each other and with MCP generate calls to the same model.

A choice i of a seeded request is seeded with seed + i, so the choices differ and each is reproducible; the
engine samples each request from its own seed, so a seeded result does not depend on what shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import anyio
import anyio.to_thread

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.pipeline.specs import GenerationSpec
from tinyllama_mcp.server.openai_api.errors import OpenAIError, from_generation
from tinyllama_mcp.server.openai_api.listing import ModelCard
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.tools import generation_spec

Progress = Callable[[float, Optional[float], Optional[str]], Awaitable[None]]


@dataclass
class Choice:
    """One choice to generate: what the generator cache's `generate` gets besides the model and the progress."""

    index: int
    spec: GenerationSpec
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    prompt_ids: Optional[list[int]] = None
    tools: Optional[list[dict]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the endpoint keeps per choice (its prompt, ...)


def build_spec(svc: Services, settings: dict[str, Any], max_tokens_param: str) -> GenerationSpec:
    """A GenerationSpec from the request's explicit settings over HF_GENERATE_KWARGS (shared with MCP generate)."""
    limit = svc.settings.max_new_tokens
    asked = settings.get("max_new_tokens")
    if asked is not None and asked > limit:
        raise OpenAIError(400, f"{max_tokens_param} {asked} is over this server's limit of {limit} "
                          "(TINYLLAMA_MCP_MAX_NEW_TOKENS); ask for fewer", param=max_tokens_param)
    if settings.get("top_p") == 0:  # OpenAI allows top_p 0: only the most likely token, i.e. greedy
        settings = {**{k: v for k, v in settings.items() if k != "top_p"}, "temperature": 0.0}
    try:
        return generation_spec(svc.settings, {k: v for k, v in settings.items() if v is not None})
    except UserError as exc:
        raise OpenAIError(400, str(exc)) from None


def seeded(spec: GenerationSpec, n: int) -> list[GenerationSpec]:
    if spec.seed is None:
        return [spec] * n
    return [spec.model_copy(update={"seed": spec.seed + i}) for i in range(n)]


async def load(svc: Services, card: ModelCard):
    """The model's tokenizer, loading the model on first use; a model that cannot be loaded is a 404."""
    try:
        return await anyio.to_thread.run_sync(svc.generators.tokenizer, card.ref)
    except UserError as exc:
        raise OpenAIError(404, f"model {card.id!r} cannot be served: {exc}", param="model",
                          code="model_not_found") from None


async def generate(svc: Services, card: ModelCard, choice: Choice,
                   progress: Optional[Progress] = None) -> GenerationResult:
    return await svc.generators.generate(card.ref, choice.messages, choice.prompt, choice.spec, progress,
                                         tools=choice.tools, prompt_ids=choice.prompt_ids)


async def generate_all(svc: Services, card: ModelCard, choices: list[Choice]) -> list[GenerationResult]:
    """Every choice at once; the first failure (in choice order) is raised as the status a client should see."""
    results: list[Any] = [None] * len(choices)

    async def one(k: int, choice: Choice) -> None:
        try:
            results[k] = await generate(svc, card, choice)
        except Exception as exc:  # kept, so one failure reaches the client as itself, not as an ExceptionGroup
            results[k] = exc

    async with anyio.create_task_group() as group:
        for k, choice in enumerate(choices):
            group.start_soon(one, k, choice)
    for result in results:
        if isinstance(result, BaseException):
            raise from_generation(result)
    return results
