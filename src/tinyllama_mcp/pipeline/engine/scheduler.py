"""The engine: requests, their queue and slots, continuous batching on a background thread, streaming, cancel.

A request holds one slot (KV-cache row) from prefill to finish. Between decode chunks, finished rows are
refilled by waiting requests (prefilled together, within a token budget) and the highest busy row is moved
into holes, so the running batch stays dense. A request that hit EOS or a stop string keeps its row for at
most two more chunks (the chunk in flight and the next); their extra tokens are dropped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Optional, Sequence

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.engine.config import EngineConfig, resolve_config
from tinyllama_mcp.pipeline.engine.exact_steps import ExactDecoding
from tinyllama_mcp.pipeline.engine.info import EngineInfo
from tinyllama_mcp.pipeline.engine.requests import EngineClosed, EngineFull, Request, RequestHandle, TextCallback
from tinyllama_mcp.pipeline.engine.runner import ModelRunner
from tinyllama_mcp.pipeline.engine.sampling import MASK32, SamplingParams
from tinyllama_mcp.pipeline.engine.weights import model_eos_ids, read_weights
from tinyllama_mcp.pipeline.generation_result import GenerationResult

log = logging.getLogger(__name__)


class Engine(ExactDecoding):
    """Continuous-batching generation over one Llama model.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=32))
    handle = engine.submit(input_ids, SamplingParams(max_new_tokens=128), on_text=cb)   # thread-safe
    result = handle.result()             # GenerationResult
    engine.generate(input_ids, params)   # submit + wait
    engine.close()
    """

    def __init__(self, model, tokenizer=None, config: Optional[EngineConfig] = None):
        weights = read_weights(model)
        self.tokenizer = tokenizer
        self.config = resolve_config(config or EngineConfig(), on_cuda=weights.embed.device.type == "cuda",
                                     model_context=weights.context, model_eos_ids=model_eos_ids(model, tokenizer))
        self.info = EngineInfo(cuda_graphs=self.config.cuda_graphs, lora_merged_privately=weights.lora_merged)
        self.runner = ModelRunner(weights, self.config, self.info)
        self.eos = set(self.config.eos_token_ids)

        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._slots: list[Optional[Request]] = [None] * self.config.max_batch
        self._adapters_to_add: list[tuple[str, list, Future]] = []
        self._closing = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.stats = {"steps": 0, "chunks": 0, "prefills": 0, "finished": 0}

    # ------------------------------------------------------------ public API

    def submit(self, input_ids: Sequence[int], params: Optional[SamplingParams] = None, *,
               on_text: Optional[TextCallback] = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises EngineFull when the queue is full, UserError when it cannot fit.

        on_text(text_so_far, completion_tokens) is called from the engine thread, at most every
        `stream_interval_s` and once at the end, with the partial text (stop strings already cut);
        it must return quickly (hand the work to your event loop). Needs a tokenizer.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in input_ids]
        cfg = self.config
        if not prompt:
            raise UserError("the prompt is empty; pass at least one token")
        if params.max_new_tokens < 0 or (params.max_new_tokens == 0 and params.prompt_logprobs is None):
            raise UserError("max_new_tokens must be at least 1 (0 only to score the prompt, with prompt_logprobs)")
        if len(prompt) + params.max_new_tokens > cfg.max_len:
            raise UserError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds this model's "
                f"context of {cfg.max_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        if max(prompt) >= self.runner.vocab or min(prompt) < 0:
            raise UserError(f"token ids must be in [0, {self.runner.vocab})")
        adapter_slot = 0
        if params.adapter is not None:
            table = self.runner.lora
            if table is None or params.adapter not in table.names:
                raise UserError(f"adapter {params.adapter!r} is not loaded in this engine; add_adapter() it first")
            adapter_slot = table.slot(params.adapter)
        if (on_text is not None or params.stop) and self.tokenizer is None:
            raise UserError("streaming text and stop strings need the engine to have a tokenizer")
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        req = Request(prompt, params, on_text, Future(), seed & MASK32, time.perf_counter(), adapter_slot=adapter_slot)
        req.future.set_running_or_notify_cancel()
        with self._cv:
            if self._error is not None:
                raise EngineClosed(f"the generation engine failed earlier ({self._error!r}); reload the model")
            if self._closing:
                raise EngineClosed("the generation engine is shut down")
            if len(self._waiting) >= cfg.max_queue:
                raise EngineFull(
                    f"the generation queue is full ({cfg.max_queue} requests waiting, {cfg.max_batch} running); "
                    "retry in a few seconds"
                )
            self._waiting.append(req)
            self._ensure_thread()
            self._cv.notify_all()
        return RequestHandle(self, req)

    def generate(self, input_ids: Sequence[int], params: Optional[SamplingParams] = None, *,
                 on_text: Optional[TextCallback] = None, timeout: Optional[float] = None) -> GenerationResult:
        return self.submit(input_ids, params, on_text=on_text).result(timeout)

    def add_adapter(self, name: str, peft_model) -> None:
        """Serve LoRA adapter `name` of `peft_model` (this engine's base with that adapter injected by PEFT) beside
        the base: requests name it in SamplingParams.adapter and share batches with every other adapter's."""
        from tinyllama_mcp.pipeline.engine.lora import read_adapter

        done: Future = Future()
        adapter = read_adapter(peft_model, name)
        with self._cv:
            if self._error is not None or self._closing:
                raise EngineClosed("the generation engine is shut down")
            self._adapters_to_add.append((name, adapter, done))
            self._ensure_thread()
            self._cv.notify_all()
        done.result()

    def _add_pending_adapters(self) -> None:
        """On the engine thread, between steps: the table grows on the stream the steps run on."""
        with self._cv:
            todo, self._adapters_to_add = self._adapters_to_add, []
        for name, adapter, done in todo:
            try:
                self.runner.add_adapter(name, adapter)
                done.set_result(None)
            except Exception as exc:
                done.set_exception(exc)

    def load(self) -> dict:
        """Running and queued request counts (for status displays)."""
        with self._cv:
            return {"running": sum(r is not None for r in self._slots), "queued": len(self._waiting),
                    "max_batch": self.config.max_batch, "max_queue": self.config.max_queue}

    def warmup(self, batch_sizes: Optional[Sequence[int]] = None, buckets: Optional[Sequence[int]] = None,
               sampling: Sequence[bool] = (False,)) -> float:
        """Capture the decode graphs up front (else they are captured on first use). Returns seconds taken.

        Call before any request is submitted.
        """
        t0 = time.perf_counter()
        graphs = self.runner.graphs
        if not graphs.enabled:
            return 0.0
        with self._cv:
            assert not self._waiting and all(s is None for s in self._slots), "warmup() before serving"
            graphs.warmup(batch_sizes, buckets, sampling)
        if graphs.enabled:
            self.runner.synchronize()
        return time.perf_counter() - t0

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the engine thread

    def _ensure_thread(self) -> None:
        # Under self._cv. The thread clears self._thread (under the lock) when it exits.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()

    def _cancel(self, req: Request) -> None:
        with self._cv:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "cancelled")

    def _run(self) -> None:
        try:
            with self.runner.thread_context():
                self._loop()
        except BaseException as exc:  # fail every request rather than leave callers hanging
            log.exception("generation engine failed")
            with self._cv:
                self._error = exc
                self._thread = None
                pending = [r for r in self._slots if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._slots = [None] * self.config.max_batch
            for r in pending:
                if not r.future.done():
                    r.future.set_exception(exc)

    def _loop(self) -> None:
        inflight = None
        while True:
            with self._cv:
                while (not self._closing and inflight is None and not self._waiting and not any(self._slots)
                       and not self._adapters_to_add):
                    if not self._cv.wait(timeout=self.config.idle_exit_s):
                        self._thread = None  # idle: let the thread go (a new one starts on submit)
                        return
                if self._closing:
                    pending = [r for r in self._slots if r is not None] + list(self._waiting)
                    self._waiting.clear()
                    for r in pending:
                        self._finish(r, "cancelled")
                    self._thread = None
                    return
                admitted = self._admit()
            if self._adapters_to_add:
                self._add_pending_adapters()
            if admitted:
                self._prefill(admitted)
            if any(r is not None and r.params.exact for r in self._slots):
                if inflight is not None:
                    self._process(*inflight)
                    inflight = None
                self._exact_step()
                self._compact()
                continue
            launched = self._launch() if any(self._slots) else None
            if inflight is not None:
                self._process(*inflight)
            inflight = launched
            self._compact()

    def _admit(self) -> list[Request]:
        """Pop waiting requests into free slots (under the lock), within the prefill token budget."""
        out, longest = [], 0
        free = [i for i, r in enumerate(self._slots) if r is None]
        while self._waiting and free:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                continue
            longest = max(longest, len(req.prompt))
            if out and longest * (len(out) + 1) > self.config.prefill_tokens:  # right-padded tokens of one prefill
                break
            self._waiting.popleft()
            req.slot = free.pop(0)
            self._slots[req.slot] = req
            out.append(req)
        return out

    def _prefill(self, reqs: list[Request]) -> None:
        plain = [r for r in reqs if not r.params.exact and r.params.prompt_logprobs is None]
        if plain:
            self.runner.prefill([r.prompt for r in plain], [r.slot for r in plain],
                                [r.params.temperature for r in plain], [r.params.top_p for r in plain],
                                [r.seed for r in plain], [r.adapter_slot for r in plain])
            for r in plain:
                r.pos = len(r.prompt)
                r.fresh = True
                r.planned = 1
        if len(plain) < len(reqs):
            self._prefill_exact([r for r in reqs if r not in plain])
        self.stats["prefills"] += 1

    def _launch(self):
        """Queue a chunk of decode steps for the busy rows; return what _process needs to read them back."""
        busy = [(i, r) for i, r in enumerate(self._slots)
                if r is not None and (r.planned < r.params.max_new_tokens or r.fresh)]
        if not busy:
            return None
        graphs, k = self.runner.graphs, self.config.chunk
        b = graphs.pad_batch(busy[-1][0] + 1)
        lb = graphs.bucket(max(r.pos for _, r in busy) + k + 1)
        sampling = any(r.params.temperature > 0 for _, r in busy)
        fresh = {i for i, r in busy if r.fresh}
        for _, r in busy:
            r.fresh = False
            r.pos += k
            r.planned += k
        host, event = self.runner.decode(b, lb, sampling, lora=any(r.adapter_slot for _, r in busy))
        self.stats["steps"] += k
        self.stats["chunks"] += 1
        return busy, fresh, host, event

    def _process(self, busy, fresh, host, event) -> None:
        """Read a chunk's tokens back: append them, finish the requests that stopped, stream the others' text."""
        if event is not None:
            event.synchronize()
        now = time.perf_counter()
        cols = host.T.tolist()  # [slot][k+1]
        for slot, req in busy:
            if req.done:
                continue
            new = cols[slot] if slot in fresh else cols[slot][1:]
            if req.first_token_t is None and new:
                req.first_token_t = now
            reason = None
            if req.cancelled:
                reason = "cancelled"
            else:
                for t in new:
                    req.tokens.append(t)
                    if t in self.eos and not req.params.ignore_eos:
                        reason = "stop"
                        break
                    if len(req.tokens) >= req.params.max_new_tokens:
                        reason = "length"
                        break
            if reason is None and req.params.stop and self._stop_hit(req):
                reason = "stop"
            if reason is not None:
                with self._cv:
                    self._finish(req, reason)
            elif req.on_text is not None and now - req.last_emit >= self.config.stream_interval_s:
                req.last_emit = now
                self._emit(req)

    def _compact(self) -> None:
        """Move the highest busy rows into lower free rows, so the padded batch stays small."""
        with self._cv:
            while True:
                busy = [i for i, r in enumerate(self._slots) if r is not None]
                free = [i for i, r in enumerate(self._slots) if r is None]
                if not busy or not free or free[0] > busy[-1]:
                    return
                src, dst = busy[-1], free[0]
                req = self._slots[src]
                self.runner.move_row(src, dst, min(req.pos + 1, self.config.max_len))
                self._slots[dst], self._slots[src] = req, None
                req.slot = dst

    # -------------------------------------------------------------- text, stop strings, finishing

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _stop_hit(self, req: Request) -> bool:
        text = self._decode(req.tokens)
        return any(s in text for s in req.params.stop)

    def _text(self, req: Request) -> str:
        text = self._decode(req.tokens)
        cuts = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text

    def _emit(self, req: Request) -> None:
        """Stream the partial text, holding back what could be the start of a stop string."""
        text = self._text(req)
        if req.params.stop:
            hold = max(len(s) for s in req.params.stop) - 1
            text = text[: max(len(text) - hold, 0)]
        if text != req.emitted:
            req.emitted = text
            try:
                req.on_text(text, len(req.tokens))
            except Exception:  # a broken callback must not stop the engine
                log.exception("engine: on_text callback failed")

    def _finish(self, req: Request, reason: str) -> None:
        """Under self._cv: release the slot, send the final text, resolve the future."""
        if req.done:
            return
        req.done = True
        if 0 <= req.slot < len(self._slots) and self._slots[req.slot] is req:
            self._slots[req.slot] = None
        now = time.perf_counter()
        text = self._text(req) if self.tokenizer is not None else ""
        if req.on_text is not None and self.tokenizer is not None:
            req.emitted = text
            try:
                req.on_text(text, len(req.tokens))
            except Exception:
                log.exception("engine: on_text callback failed")
        self.stats["finished"] += 1
        req.future.set_result(GenerationResult(
            text=text, finish_reason=reason, prompt_tokens=len(req.prompt), completion_tokens=len(req.tokens),
            latency_ms=round((now - req.submitted) * 1000, 2), token_ids=list(req.tokens),
            ttft_ms=round(((req.first_token_t or now) - req.submitted) * 1000, 2),
            prompt_token_ids=list(req.prompt),
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs,
        ))
