"""A request's state inside the engine, the handle its caller holds, and the engine's two refusals."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.engine.sampling import SamplingParams
from tinyllama_mcp.pipeline.generation_result import GenerationResult, TokenLogprob

TextCallback = Callable[[str, int], None]  # on_text(text_so_far, completion_tokens)


class EngineFull(UserError):
    """The engine's queue is full: the caller should retry later."""


class EngineClosed(UserError):
    """The engine was shut down, or failed: nothing more can be submitted to it."""


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_text: Optional[TextCallback]
    future: Future
    seed: int
    submitted: float
    adapter_slot: int = 0  # the row's adapter in the runner's LoraTable (0: the base)
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    pos: int = 0  # host count of the position of the next decode input
    done: bool = False
    cancelled: bool = False
    first_token_t: Optional[float] = None
    emitted: str = ""
    fresh: bool = False  # prefilled, first token not yet read back
    planned: int = 0  # tokens that launched work will have produced (no chunk is launched past max_new_tokens)
    last_emit: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, where params.logprobs is set
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None


class RequestHandle:
    """What `Engine.submit` returns: a future of a GenerationResult, and a way to cancel."""

    def __init__(self, engine, req: Request):
        self._engine, self._req = engine, req
        self.future: Future = req.future

    def result(self, timeout: Optional[float] = None) -> GenerationResult:
        return self.future.result(timeout)

    def cancel(self) -> None:
        """Stop generating; the future resolves with finish_reason 'cancelled' and the tokens so far."""
        self._engine._cancel(self._req)

    def done(self) -> bool:
        return self.future.done()
