"""Generation off the event loop: models load lazily in a worker thread and stay cached.

`pipeline.generate` imports torch, so it is imported on first use, inside the thread. A model is
loaded once (a few seconds) and reused; at most `max_loaded` stay in memory, least recently used
first out. Calls to one model are serialized (a model instance is not shared between concurrent
generate calls), while the event loop keeps answering other requests such as `status`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import anyio.to_thread

from pipeline.specs import GenerationSpec
from server.errors import UserError


@dataclass
class _Loaded:
    generator: Any
    lock: threading.Lock


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: float


class GeneratorCache:
    def __init__(self, max_loaded: int = 2) -> None:
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._load_lock = threading.Lock()

    def _get(self, model_ref: str) -> _Loaded:
        with self._load_lock:
            entry = self._loaded.get(model_ref)
            if entry is not None:
                self._loaded.move_to_end(model_ref)
                return entry
            from pipeline.errors import UserError as PipelineUserError
            from pipeline.generate import load_generator

            try:
                entry = _Loaded(load_generator(model_ref), threading.Lock())
            except PipelineUserError as exc:
                raise UserError(str(exc)) from None
            self._loaded[model_ref] = entry
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return entry

    def generate_sync(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec
    ) -> Generated:
        started = time.perf_counter()
        entry = self._get(model_ref)
        from pipeline.errors import UserError as PipelineUserError

        with entry.lock:
            try:
                result = entry.generator.generate(messages=messages, prompt=prompt, spec=spec)
            except PipelineUserError as exc:
                raise UserError(str(exc)) from None
        return Generated(
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def generate(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec
    ) -> Generated:
        # abandon_on_cancel: a client that gives up gets its answer back at once; the thread finishes alone.
        return await anyio.to_thread.run_sync(
            self.generate_sync, model_ref, messages, prompt, spec, abandon_on_cancel=True
        )
