"""Generation off the event loop: models load lazily in a worker thread and stay cached.

`pipeline.generate` imports torch, so it is imported on first use, inside the thread. A model is
loaded once (a few seconds) and reused; at most `max_loaded` stay in memory, least recently used
first out. Adapters trained on one model are served by that model's one Generator, so their requests batch
together. Concurrent calls to one model go to its engine together, which batches them (requests
join and leave the running batch between decode steps), while the event loop keeps answering other
requests such as `status`. Partial text is streamed back to the loop as progress reports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from functools import partial
from typing import Any, Awaitable, Callable, Optional

import anyio
import anyio.to_thread

from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.pipeline.specs import GenerationSpec
from tinyllama_mcp.errors import UserError

log = logging.getLogger("tinyllama_mcp")


class GeneratorCache:
    def __init__(self, max_loaded: int = 2, max_queue: int = 256) -> None:
        self.max_loaded = max_loaded
        self.max_queue = max_queue  # requests per model waiting for a batch row; more raise EngineFull
        self._limiter: Optional[anyio.CapacityLimiter] = None
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # serving key -> Generator (adapters inside)
        self._keys: dict[str, tuple[str, Optional[str]]] = {}  # model_ref -> (serving key, adapter folder)
        self._load_lock = threading.Lock()

    def _get(self, model_ref: str) -> tuple[Any, Optional[str]]:
        """(the Generator serving model_ref, the adapter name to ask it for, or None)."""
        with self._load_lock:
            from tinyllama_mcp.pipeline.generate import load_base, serving_key

            try:  # a UserError passes as it is
                if model_ref not in self._keys:
                    self._keys[model_ref] = serving_key(model_ref)
                key, adapter_dir = self._keys[model_ref]
                entry = self._loaded.get(key)
                if entry is None:
                    from tinyllama_mcp.pipeline.engine import EngineConfig

                    entry = load_base(model_ref, adapter_dir, engine_config=EngineConfig(max_queue=self.max_queue))
                    self._loaded[key] = entry
                    while len(self._loaded) > self.max_loaded:
                        # Dropped, not closed: a call may still be running on it; its idle engine thread exits alone.
                        self._loaded.popitem(last=False)
                self._loaded.move_to_end(key)
                return entry, entry.add_adapter(adapter_dir) if adapter_dir is not None else None
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

    def tokenizer(self, model_ref: str):
        """The tokenizer of a model (loading the model on first use, as generate does)."""
        return self._get(model_ref)[0].tokenizer

    def max_model_len(self, model_ref: str) -> int:
        """Prompt plus new tokens one request to this model may hold."""
        return self._get(model_ref)[0].max_model_len

    def generate_sync(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec,
        on_text: Optional[Callable[[str, int], None]] = None, *,
        tools: Optional[list[dict]] = None, prompt_ids: Optional[list[int]] = None,
        cancelled: Optional[threading.Event] = None,
    ) -> GenerationResult:
        """The generator's result, its latency counted from here: a model's first load included."""
        started = time.perf_counter()
        generator, adapter = self._get(model_ref)
        result = generator.generate(messages=messages, prompt=prompt, spec=spec, on_text=on_text, tools=tools,
                                    prompt_ids=prompt_ids, adapter=adapter, cancelled=cancelled)
        return replace(result, latency_ms=round((time.perf_counter() - started) * 1000, 1))

    async def generate(
        self, model_ref: str, messages: Optional[list[dict]], prompt: Optional[str], spec: GenerationSpec,
        report_progress: Optional[Callable[[float, Optional[float], Optional[str]], Awaitable[None]]] = None, *,
        tools: Optional[list[dict]] = None, prompt_ids: Optional[list[int]] = None,
    ) -> GenerationResult:
        """`report_progress(completion_tokens, max_new_tokens, partial_text)` is awaited on this loop as text grows."""
        on_text = None
        async with anyio.create_task_group() as reports:
            if report_progress is not None:
                on_text, relay = _progress_relay(report_progress, spec.max_new_tokens)
                reports.start_soon(relay)
            # abandon_on_cancel: a client that gives up gets its answer back at once; `cancelled` then tells the
            # engine to stop the request. Its own limiter: anyio's default 40 threads would cap the batch.
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self.max_queue + 64)
            cancelled = threading.Event()
            try:
                call = partial(self.generate_sync, tools=tools, prompt_ids=prompt_ids, cancelled=cancelled)
                return await anyio.to_thread.run_sync(
                    call, model_ref, messages, prompt, spec, on_text, abandon_on_cancel=True, limiter=self._limiter
                )
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
            except UserError as exc:
                # Raised out of the task group it would arrive wrapped in an ExceptionGroup, which the
                # tool layer cannot recognise as the caller's mistake: the caller would see a bare crash.
                error = exc
            finally:
                # Done, failed or cancelled: the relay has nothing left to send that the result does not hold.
                reports.cancel_scope.cancel()
        raise error


def _progress_relay(report_progress, total: int):
    """(on_text for the engine's thread, the loop task that reports). The engine thread never waits for the loop:
    it leaves the newest text and wakes the relay, which reports only the newest when the loop is slower."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    newest: list[tuple[int, str]] = []

    def on_text(text: str, completion_tokens: int) -> None:
        newest.append((completion_tokens, text))
        if not wake.is_set():
            loop.call_soon_threadsafe(wake.set)

    async def relay() -> None:
        while True:
            await wake.wait()
            wake.clear()
            if newest:
                completion_tokens, text = newest[-1]
                newest.clear()
                await report_progress(completion_tokens, total, text)

    return on_text, relay
