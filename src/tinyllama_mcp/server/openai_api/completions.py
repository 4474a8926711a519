"""POST /v1/completions: raw prompts (text or token ids, one or a list) continued without the chat template.

`echo` returns the prompt before the continuation; with `logprobs` it also scores the prompt's tokens (the first
one null), and with `max_tokens: 0` nothing is generated: what lm-eval's local-completions needs to score
loglikelihood tasks. Choice k*n + j is prompt k's j-th choice, as OpenAI numbers them.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Optional

import anyio.to_thread

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.server.openai_api.errors import OpenAIError
from tinyllama_mcp.server.openai_api.listing import ModelCard, find_model
from tinyllama_mcp.server.openai_api.logprobs import completion_logprobs
from tinyllama_mcp.server.openai_api.runs import Choice, build_spec, generate_all, load, seeded
from tinyllama_mcp.server.openai_api.schemas import CompletionRequest
from tinyllama_mcp.server.openai_api.streaming import GenerationStream, TextDeltas
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.tools import check_prompt_size

FINISH = {"stop": "stop", "length": "length"}


def continuation(tokenizer, prompt_ids: list[int], ids: list[int], stops: list[str]) -> str:
    """The generated text as it continues the prompt (decoded in the prompt's context, so a SentencePiece
    tokenizer keeps the leading space it drops from a lone first token), cut at the first stop string."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode([*prompt_ids, *ids], skip_special_tokens=True)
    text = whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


def _prompt_text(tokenizer, choice: Choice) -> str:
    if choice.prompt is not None:
        return choice.prompt
    return tokenizer.decode(choice.prompt_ids or [], skip_special_tokens=True)


def _answer(req: CompletionRequest, tokenizer, choice: Choice, result: GenerationResult) -> tuple[str, Any, str]:
    """(text, logprobs, finish_reason) of one choice."""
    prompt_ids = list(result.prompt_token_ids) or list(choice.prompt_ids or []) \
        or tokenizer(choice.prompt)["input_ids"]
    text = continuation(tokenizer, prompt_ids, list(result.token_ids), req.stop)
    if req.echo:
        text = _prompt_text(tokenizer, choice) + text
    logprobs = None
    if req.logprobs is not None:
        ids = list(result.token_ids)
        items: list[Any] = list(result.logprobs) if result.logprobs is not None else [None] * len(ids)
        if req.echo:
            prompt_items = result.prompt_logprobs if result.prompt_logprobs is not None else [None] * len(prompt_ids)
            ids, items = [*prompt_ids, *ids], [*prompt_items, *items]
        logprobs = completion_logprobs(tokenizer, ids, items, req.logprobs)
    finish = FINISH.get(result.finish_reason, "stop")
    return text, logprobs, finish


def _usage(results: list[GenerationResult], n: int) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results[::n]) if results else 0  # each prompt counted once
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionChunks:
    """text_completion chunks: (echo) the prompt first, text deltas, the finish chunk with the logprobs, then
    (stream_options.include_usage) a chunk with empty choices and the usage."""

    def __init__(self, req: CompletionRequest, tokenizer, choices: list[Choice], completion_id: str, created: int):
        self.req, self.tokenizer, self.choices = req, tokenizer, choices
        self.head = {"id": completion_id, "object": "text_completion", "created": created, "model": req.model}
        self.deltas = {c.index: TextDeltas(strip=False, stops=req.stop) for c in choices}
        self.results: dict[int, GenerationResult] = {}

    def _chunk(self, index: int, text: str, finish: Optional[str] = None, logprobs: Any = None) -> dict:
        chunk = {**self.head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        if not self.req.echo:
            return []
        return [self._chunk(c.index, _prompt_text(self.tokenizer, c)) for c in self.choices]

    def text(self, choice: Choice, text: str) -> list[dict]:
        delta = self.deltas[choice.index].update(text)
        return [self._chunk(choice.index, delta)] if delta else []

    def done(self, choice: Choice, result: GenerationResult) -> list[dict]:
        self.results[choice.index] = result
        text, logprobs, finish = _answer(self.req, self.tokenizer, choice, result)
        if self.req.echo:
            text = text[len(_prompt_text(self.tokenizer, choice)):]
        deltas = self.deltas[choice.index]
        rest = deltas.finish(text)
        if not rest and not text.startswith(deltas.sent):
            # the engine's text lacked the leading space that decoding in the prompt's context keeps
            rest = deltas.finish(text.lstrip(" "))
        return [self._chunk(choice.index, rest, finish, logprobs)]

    def end(self) -> list[dict]:
        if not self.req.include_usage:
            return []
        results = [self.results[c.index] for c in self.choices if c.index in self.results]
        return [{**self.head, "choices": [], "usage": _usage(results, self.req.n)}]


async def completions(svc: Services, req: CompletionRequest):
    card: ModelCard = await anyio.to_thread.run_sync(find_model, svc, req.model)
    for prompt in req.prompt:
        try:
            check_prompt_size(svc.settings, len(prompt) if isinstance(prompt, str) else 0)
        except UserError as exc:
            raise OpenAIError(400, str(exc), param="prompt") from None
    spec = build_spec(svc, {
        "max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "stop": req.stop or None, "seed": req.seed, "logprobs": req.logprobs,
        "prompt_logprobs": req.logprobs if req.echo else None,
    }, "max_tokens")
    tokenizer = await load(svc, card)
    vocab = len(tokenizer)
    choices = []
    for k, prompt in enumerate(req.prompt):
        if not isinstance(prompt, str) and (min(prompt) < 0 or max(prompt) >= vocab):
            raise OpenAIError(400, f"prompt {k} holds token ids outside this model's vocabulary [0, {vocab})",
                              param="prompt")
        for j, spec_j in enumerate(seeded(spec, req.n)):
            text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
            choices.append(Choice(index=k * req.n + j, spec=spec_j, prompt=text, prompt_ids=ids))
    completion_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return GenerationStream(svc, card, choices, CompletionChunks(req, tokenizer, choices, completion_id, created))
    results = await generate_all(svc, card, choices)
    out = []
    for choice, result in zip(choices, results):
        text, logprobs, finish = _answer(req, tokenizer, choice, result)
        out.append({"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish})
    return {"id": completion_id, "object": "text_completion", "created": created, "model": req.model,
            "choices": out, "usage": _usage(results, req.n), "system_fingerprint": None}
