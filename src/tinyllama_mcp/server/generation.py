"""Generation off the event loop: models load lazily in a worker thread and stay cached.

`pipeline.generate` imports torch, so it is imported on first use, inside the thread. A model is
loaded once (a few seconds) and reused; at most `max_loaded` stay in memory, least recently used
first out. Concurrent calls to one model go to its engine together, which batches them (requests
join and leave the running batch between decode steps), while the event loop keeps answering other
requests such as `status`. Partial text is streamed back to the loop as progress reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Awaitable, Callable, Optional

import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.pipeline.specs import GenerationSpec
from tinyllama_mcp.errors import UserError

log = logging.getLogger("tinyllama_mcp")


class GeneratorCache:
    def __init__(self, max_loaded: int = 2) -> None:
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._load_lock = threading.Lock()

    def _get(self, model_ref: str):
        with self._load_lock:
            entry = self._loaded.get(model_ref)
            if entry is not None:
                self._loaded.move_to_end(model_ref)
                return entry
            from tinyllama_mcp.pipeline.generate import load_generator

            try:
                entry = load_generator(model_ref)  # a UserError passes as it is
            except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
                # A folder or hub id that is not a loadable model (no weights, an unknown architecture,
                # a model that asks for remote code, which is never run): the caller's to fix, so a
                # clear one-line error rather than a crash; the traceback stays in the server log.
                log.warning("could not load model %r", model_ref, exc_info=True)
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise UserError(
                    f"could not load model {model_ref!r} ({type(exc).__name__}: {first}); "
                    "pass a Hugging Face checkpoint folder, a finished job, a hub id or 'tiny-demo'"
                ) from None
            self._loaded[model_ref] = entry
            while len(self._loaded) > self.max_loaded:
                # Dropped, not closed: a call may still be running on it; its idle engine thread exits alone.
                self._loaded.popitem(last=False)
            return entry

    def generate_sync(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec,
        on_text: Optional[Callable[[str, int], None]] = None,
    ) -> GenerationResult:
        """The generator's result, its latency counted from here: a model's first load included."""
        started = time.perf_counter()
        generator = self._get(model_ref)
        result = generator.generate(messages=messages, prompt=prompt, spec=spec, on_text=on_text)
        return replace(result, latency_ms=round((time.perf_counter() - started) * 1000, 1))

    async def generate(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec,
        report_progress: Optional[Callable[[float, Optional[float], Optional[str]], Awaitable[None]]] = None,
    ) -> GenerationResult:
        """`report_progress(completion_tokens, max_new_tokens, partial_text)` is awaited on this loop as text grows."""
        on_text = None
        async with anyio.create_task_group() as reports:
            if report_progress is not None:
                token = anyio.lowlevel.current_token()

                def on_text(text: str, completion_tokens: int) -> None:
                    # Called on the engine's thread: hand the report to the loop without waiting for it to be sent.
                    anyio.from_thread.run_sync(
                        reports.start_soon, report_progress, completion_tokens, spec.max_new_tokens, text, token=token
                    )

            # abandon_on_cancel: a client that gives up gets its answer back at once; the thread finishes alone.
            try:
                return await anyio.to_thread.run_sync(
                    self.generate_sync, model_ref, messages, prompt, spec, on_text, abandon_on_cancel=True
                )
            except UserError as exc:
                # Raised out of the task group it would arrive wrapped in an ExceptionGroup, which the
                # tool layer cannot recognise as the caller's mistake: the caller would see a bare crash.
                error = exc
        raise error
