"""Generation: chat messages or a raw prompt -> text, from any model this tool knows.

A model reference is `tiny-demo`, a hub id, a merged checkpoint folder, an adapter folder
(its stack is rebuilt and the last adapter served unmerged), or a job folder holding either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.pipeline.specs import GenerationSpec


def resolve_ref(model_ref: str) -> tuple[str, str]:
    """(kind, path): kind is 'adapter' or 'model'. Job folders resolve to their merged/ or adapter/."""
    path = Path(model_ref).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not modeling.is_adapter_dir(path):
        for sub in ("merged", "adapter"):
            if (path / sub).is_dir():
                path = path / sub
                break
    if path.is_dir() and modeling.is_adapter_dir(path):
        return "adapter", str(path.resolve())
    return "model", modeling.resolve_model(str(path) if path.exists() else model_ref)


def render_input(tokenizer, messages: Optional[list[dict]], prompt: Optional[str]) -> list[int]:
    if (messages is None) == (prompt is None):
        raise UserError("pass exactly one of 'messages' (a chat) or 'prompt' (raw text)")
    if messages is not None:
        from tinyllama_mcp.pipeline.data import check_messages

        try:
            clean = check_messages(messages, "messages", need_final_assistant=False)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_ids(model, tokenizer, input_ids: list[int], spec: GenerationSpec):
    """Run transformers' generate; returns the new token ids."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    kwargs = dict(
        max_new_tokens=spec.max_new_tokens,
        do_sample=spec.sampling,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_mask=torch.ones_like(ids),
    )
    if spec.sampling:
        kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
    if spec.stop:
        kwargs.update(stop_strings=spec.stop, tokenizer=tokenizer)
    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    return out[0, len(input_ids) :].tolist()


class Generator:
    """A loaded model and tokenizer; safe to share between threads.

    Llama-architecture models are served by `pipeline.engine.Engine` (static KV cache, CUDA-graph
    decode, continuous batching: concurrent calls share decode steps); anything else, or
    TINYLLAMA_MCP_ENGINE=0, uses transformers' generate, one call at a time.
    """

    def __init__(self, model, tokenizer, ref: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ref = ref
        self._lock = threading.Lock()
        self._engine = None
        self._engine_off = os.environ.get("TINYLLAMA_MCP_ENGINE", "1") == "0"

    def engine(self):
        """The generation engine, built on first use; None where the model needs plain HF generate."""
        if self._engine_off:
            return None
        with self._lock:
            if self._engine is None and not self._engine_off:
                from tinyllama_mcp.pipeline.engine import Engine, EngineUnsupported

                try:
                    self._engine = Engine(self.model, self.tokenizer)
                except EngineUnsupported as exc:
                    self._engine_off = True
                    logging.getLogger(__name__).info("serving %s with transformers' generate: %s", self.ref, exc)
            return self._engine

    def generate(
        self, messages: Optional[list[dict]] = None, prompt: Optional[str] = None, spec: Optional[GenerationSpec] = None,
        on_text: Optional[Callable[[str, int], None]] = None,
    ) -> GenerationResult:
        """on_text(partial_text, completion_tokens), if given, is called from the engine thread as text arrives."""
        spec = spec or GenerationSpec()
        start = time.perf_counter()
        input_ids = render_input(self.tokenizer, messages, prompt)
        engine = self.engine()
        if engine is not None:
            from tinyllama_mcp.pipeline.engine import SamplingParams

            res = engine.generate(input_ids, SamplingParams.from_spec(spec), on_text=on_text)
            new_ids, text, finish, ttft_ms = res.token_ids, res.text, res.finish_reason, res.ttft_ms
        else:
            with self._lock:
                new_ids = generate_ids(self.model, self.tokenizer, input_ids, spec)
            stopped = bool(new_ids) and new_ids[-1] == self.tokenizer.eos_token_id
            text, cut = _cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), spec.stop)
            finish = "stop" if stopped or cut or len(new_ids) < spec.max_new_tokens else "length"
            ttft_ms = None  # transformers' generate returns all tokens at once
            if on_text is not None:
                on_text(text, len(new_ids))
        return GenerationResult(
            text=text.strip(),
            finish_reason=finish,
            prompt_tokens=len(input_ids),
            completion_tokens=len(new_ids),
            latency_ms=round((time.perf_counter() - start) * 1000, 1),
            token_ids=new_ids,
            ttft_ms=ttft_ms,
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def load_generator(model_ref: str, dtype: str = "auto") -> Generator:
    """Load a model for serving (16-bit on GPU, fp32 on CPU unless told otherwise)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = modeling.compute_dtype(dtype)
    kind, path = resolve_ref(model_ref)
    if kind == "adapter":
        model, stack = modeling.build_stack(path, torch_dtype, keep_last_unmerged=True)
        tokenizer = modeling.load_tokenizer(path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map={"": modeling.device()})
        except OSError as exc:
            raise UserError(f"could not load model '{model_ref}': {exc}") from None
        tokenizer = modeling.load_tokenizer(path)
    return Generator(model, tokenizer, ref=path)
