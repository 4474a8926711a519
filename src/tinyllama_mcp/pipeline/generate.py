"""Generation: chat messages or a raw prompt -> text, from any model this tool knows.

A model reference is `tiny-demo`, a hub id, a merged checkpoint folder, an adapter folder
(its stack is rebuilt and the last adapter served unmerged), or a job folder holding either.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import replace
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


def render_input(tokenizer, messages: Optional[list[dict]], prompt: Optional[str],
                 tools: Optional[list[dict]] = None, prompt_ids: Optional[list[int]] = None) -> list[int]:
    """The prompt's token ids: a chat (with its tools) through the chat template, raw text, or ids as given."""
    if sum(x is not None for x in (messages, prompt, prompt_ids)) != 1:
        raise UserError("pass exactly one of 'messages' (a chat), 'prompt' (raw text) or prompt token ids")
    if prompt_ids is not None:
        return [int(t) for t in prompt_ids]
    if tools and messages is None:
        raise UserError("tools apply to a chat: pass messages")
    if messages is not None:
        from tinyllama_mcp.pipeline.data import check_messages

        try:
            clean = check_messages(messages, "messages", need_final_assistant=False)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False, **extra)
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


PROBE = "The quick brown fox jumps over the lazy dog. Question: what is 2 + 3? Answer:"


class Generator:
    """A loaded model and tokenizer, and the LoRA adapters served on top of it; safe to share between threads.

    Llama-architecture models are served by `pipeline.engine.Engine` (static KV cache, CUDA-graph
    decode, continuous batching: concurrent calls share decode steps, whichever adapter each names);
    anything else, or TINYLLAMA_MCP_ENGINE=0, uses transformers' generate, one call at a time.
    """

    def __init__(self, model, tokenizer, ref: str, engine_config=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ref = ref
        self.engine_config = engine_config  # an engine.EngineConfig; None: the engine's defaults
        self.adapters: dict[str, str] = {}  # adapter folder -> its name in the model and the engine
        self.default_adapter: Optional[str] = None  # what generate serves when no adapter is named
        self._lock = threading.RLock()
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
                    self._engine = Engine(self.model, self.tokenizer, self.engine_config)
                except EngineUnsupported as exc:
                    self._engine_off = True
                    logging.getLogger(__name__).info("serving %s with transformers' generate: %s", self.ref, exc)
            return self._engine

    def add_adapter(self, adapter_dir: str) -> str:
        """Serve the LoRA adapter in `adapter_dir` on this model (which must be the model it was trained on);
        returns its name. Refused with a UserError when it does not change the output on a fixed probe: its
        weights are zero or its module names miss the model's, and it would silently answer as the base."""
        from peft import PeftModel

        with self._lock:
            if adapter_dir in self.adapters:
                return self.adapters[adapter_dir]
            engine = self.engine()  # read from the model before PEFT wraps it
            name = f"adapter{len(self.adapters) + 1}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter_dir, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=name).eval()
            if not self._changes_output(name):
                self.model.delete_adapter(name)
                raise UserError(
                    f"the adapter in {adapter_dir} does not change the model's output on a fixed probe: its LoRA "
                    "weights are zero or its module names do not match this base model's, so it would answer "
                    "exactly as the base. Refusing to serve it under its own name; retrain it on this base model"
                )
            if engine is not None:
                engine.add_adapter(name, self.model)
            self.adapters[adapter_dir] = name
            return name

    @property
    def max_model_len(self) -> int:
        """Prompt plus new tokens one request may hold: the engine's limit, else the model's context."""
        engine = self.engine()
        if engine is not None:
            return int(engine.config.max_len)
        from tinyllama_mcp.pipeline.nn.llama import causal_lm_of

        return int(getattr(causal_lm_of(self.model).config, "max_position_embeddings", 0) or 0)

    def _changes_output(self, name: str) -> bool:
        ids = torch.tensor([self.tokenizer(PROBE)["input_ids"]], device=next(self.model.parameters()).device)
        self.model.set_adapter(name)
        with torch.inference_mode():
            on = self.model(ids).logits.float()
            with self.model.disable_adapter():
                off = self.model(ids).logits.float()
        return (on - off).abs().max().item() > 1e-5 * max(1.0, off.abs().max().item())

    def generate(
        self, messages: Optional[list[dict]] = None, prompt: Optional[str] = None, spec: Optional[GenerationSpec] = None,
        on_text: Optional[Callable[[str, int], None]] = None, *,
        tools: Optional[list[dict]] = None, prompt_ids: Optional[list[int]] = None, adapter: Optional[str] = None,
        cancelled: Optional[threading.Event] = None,
    ) -> GenerationResult:
        """on_text(partial_text, completion_tokens), if given, is called from the engine thread as text arrives.
        adapter: a name add_adapter returned (default: default_adapter, else the model itself). cancelled: once
        set (the caller went away), the engine stops the request and frees its row."""
        spec = spec or GenerationSpec()
        adapter = adapter or self.default_adapter
        start = time.perf_counter()
        input_ids = render_input(self.tokenizer, messages, prompt, tools, prompt_ids)
        engine = self.engine()
        if engine is not None:
            from tinyllama_mcp.pipeline.engine import SamplingParams

            params = SamplingParams.from_spec(spec)
            params.adapter = adapter
            if spec.grammar is not None:
                from tinyllama_mcp.pipeline.constraint import GrammarConstraint

                params.constraint = GrammarConstraint(spec.grammar, self.tokenizer, engine.runner.vocab)
            handle = engine.submit(input_ids, params, on_text=on_text)
            while True:
                try:
                    result = handle.result(timeout=0.1 if cancelled is not None else None)
                    break
                except FutureTimeout:
                    if cancelled.is_set():
                        handle.cancel()
            return replace(result, text=result.text.strip(), latency_ms=round((time.perf_counter() - start) * 1000, 1))
        if spec.grammar is not None or spec.logprobs is not None or spec.prompt_logprobs is not None:
            raise UserError(
                f"{self.ref} is served with transformers' generate, which has no grammars or log-probabilities here; "
                "use a Llama-architecture model (tiny-demo, TinyLlama, a merge or an adapter of one)"
            )
        if spec.max_new_tokens == 0:
            raise UserError("max_new_tokens must be at least 1")
        with self._lock:  # one call at a time: the active adapter is the model's state
            if adapter is not None:
                self.model.set_adapter(adapter)
            base_only = self.model.disable_adapter() if adapter is None and self.adapters else nullcontext()
            with base_only:
                new_ids = generate_ids(self.model, self.tokenizer, input_ids, spec)
        stopped = bool(new_ids) and new_ids[-1] == self.tokenizer.eos_token_id
        text, cut = _cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), spec.stop)
        finish = "stop" if stopped or cut or len(new_ids) < spec.max_new_tokens else "length"
        if on_text is not None:
            on_text(text, len(new_ids))
        return GenerationResult(
            text=text.strip(), finish_reason=finish, prompt_tokens=len(input_ids), completion_tokens=len(new_ids),
            latency_ms=round((time.perf_counter() - start) * 1000, 1), token_ids=new_ids,
            prompt_token_ids=list(input_ids),  # ttft_ms stays None: transformers' generate returns all tokens at once
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def serving_key(model_ref: str) -> tuple[str, Optional[str]]:
    """(what the model is loaded as, the adapter folder or None). Adapters trained on one model share its key,
    so they are served by one Generator and batch together."""
    kind, path = resolve_ref(model_ref)
    if kind != "adapter":
        return path, None
    stack = modeling.read_stack(path)
    below = {key: value for key, value in stack.items() if key != "adapters"}
    below["adapters_below"] = stack["adapters"][:-1]
    return "stack:" + json.dumps(below, sort_keys=True), path


def load_base(model_ref: str, adapter_dir: Optional[str], dtype: str = "auto", engine_config=None) -> Generator:
    """The model `model_ref` names, or with adapter_dir the model that adapter was trained on (its stack's base
    with the earlier adapters merged), for serving: 16-bit on GPU, fp32 on CPU unless told otherwise."""
    from transformers import AutoModelForCausalLM

    torch_dtype = modeling.compute_dtype(dtype)
    if adapter_dir is not None:
        stack = modeling.read_stack(adapter_dir)
        model = modeling.stack_base(stack, torch_dtype)
        return Generator(model, modeling.load_tokenizer(adapter_dir), ref=f"the base of {adapter_dir}",
                         engine_config=engine_config)
    path = resolve_ref(model_ref)[1]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map={"": modeling.device()})
    except OSError as exc:
        raise UserError(f"could not load model '{model_ref}': {exc}") from None
    return Generator(model, modeling.load_tokenizer(path), ref=path, engine_config=engine_config)


def load_generator(model_ref: str, dtype: str = "auto") -> Generator:
    """A Generator serving `model_ref`: a model, or an adapter (its base loaded, the adapter added and served
    by default)."""
    _, adapter_dir = serving_key(model_ref)
    generator = load_base(model_ref, adapter_dir, dtype)
    if adapter_dir is not None:
        generator.default_adapter = generator.add_adapter(adapter_dir)
    return generator
