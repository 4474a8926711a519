"""POST /v1/chat/completions: messages (system, developer, user, assistant with tool_calls, tool) through the chat
template, tools and response_format through constrained decoding (pipeline.grammars), answers in OpenAI's shapes.

With tools (and tool_choice not 'none') the answer is parsed back into `tool_calls` (pipeline.tool_format), each
with an id of its own, finish_reason 'tool_calls'. Streamed, a tool-call turn is held back until it is complete
and then sent as tool_calls deltas: the id, type and name first, then the arguments.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Optional

import anyio.to_thread

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.server.openai_api.errors import OpenAIError
from tinyllama_mcp.server.openai_api.listing import ModelCard, find_model
from tinyllama_mcp.server.openai_api.logprobs import chat_logprobs
from tinyllama_mcp.server.openai_api.runs import Choice, build_spec, generate_all, load, seeded
from tinyllama_mcp.server.openai_api.schemas import ChatRequest
from tinyllama_mcp.server.openai_api.streaming import GenerationStream, TextDeltas
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.tools import check_prompt_size

FINISH = {"stop": "stop", "length": "length"}


def _grammar(req: ChatRequest) -> Optional[str]:
    from tinyllama_mcp.pipeline.grammars import chat_grammar

    try:
        return chat_grammar(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format)
    except UserError as exc:
        text = str(exc)
        param = next((p for p in ("tool_choice", "response_format", "tools") if p in text),
                     "tools" if req.tools else "response_format")
        raise OpenAIError(400, text, param=param) from None


def _prompt_size(messages: list[dict]) -> int:
    size = 0
    for message in messages:
        size += len(message.get("content") or "")
        for call in message.get("tool_calls") or ():
            arguments = call["function"]["arguments"]
            size += len(arguments if isinstance(arguments, str) else json.dumps(arguments))
    return size


def _answer(req: ChatRequest, tokenizer, result: GenerationResult) -> tuple[Optional[str], list[dict], str, Any]:
    """(content, tool_calls, finish_reason, logprobs) of one choice."""
    from tinyllama_mcp.pipeline.tool_format import parse_tool_calls

    content, calls = parse_tool_calls(result.text) if req.tools_active else (result.text, [])
    tool_calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                   "function": {"name": call["name"], "arguments": call["arguments"]}} for call in calls]
    finish = "tool_calls" if tool_calls else FINISH.get(result.finish_reason, "stop")
    logprobs = None
    if req.logprobs and result.logprobs is not None:
        items = list(result.logprobs)
        if items and result.finish_reason == "stop" and items[-1].token_id == tokenizer.eos_token_id:
            items = items[:-1]  # the end of the turn is no part of the content
        logprobs = chat_logprobs(tokenizer, items, req.top_logprobs or 0)
    return content, tool_calls, finish, logprobs


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatChunks:
    """chat.completion.chunk objects: a role delta per choice, content deltas, tool_calls deltas, the finish chunk,
    then (stream_options.include_usage) a chunk with empty choices and the usage."""

    def __init__(self, req: ChatRequest, tokenizer, completion_id: str, created: int) -> None:
        from tinyllama_mcp.pipeline.tool_format import may_start_tool_calls

        self.req, self.tokenizer = req, tokenizer
        self.head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model}
        hold = may_start_tool_calls if req.tools_active else None
        self.deltas = [TextDeltas(strip=True, stops=req.stop, hold=hold) for _ in range(req.n)]
        self.results: list[GenerationResult] = []

    def _chunk(self, index: int, delta: dict, finish: Optional[str] = None, logprobs: Any = None) -> dict:
        chunk = {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": finish}]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def text(self, choice: Choice, text: str) -> list[dict]:
        delta = self.deltas[choice.index].update(text)
        return [self._chunk(choice.index, {"content": delta})] if delta else []

    def done(self, choice: Choice, result: GenerationResult) -> list[dict]:
        self.results.append(result)
        content, tool_calls, finish, logprobs = _answer(self.req, self.tokenizer, result)
        chunks = []
        rest = self.deltas[choice.index].finish(content or "")
        if rest:
            chunks.append(self._chunk(choice.index, {"content": rest}))
        for k, call in enumerate(tool_calls):
            function = call["function"]
            chunks.append(self._chunk(choice.index, {"tool_calls": [
                {"index": k, "id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": ""}}
            ]}))
            chunks.append(self._chunk(choice.index, {"tool_calls": [
                {"index": k, "function": {"arguments": function["arguments"]}}
            ]}))
        chunks.append(self._chunk(choice.index, {}, finish, logprobs))
        return chunks

    def end(self) -> list[dict]:
        if not self.req.include_usage:
            return []
        return [{**self.head, "choices": [], "usage": _usage(self.results)}]


async def chat_completions(svc: Services, req: ChatRequest):
    card: ModelCard = await anyio.to_thread.run_sync(find_model, svc, req.model)
    messages = [m.for_template() for m in req.messages]
    try:
        check_prompt_size(svc.settings, _prompt_size(messages))
    except UserError as exc:
        raise OpenAIError(400, str(exc), param="messages") from None
    grammar = await anyio.to_thread.run_sync(_grammar, req)  # compiling a schema can take a moment
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    spec = build_spec(svc, {
        "max_new_tokens": req.max_new_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "stop": req.stop or None, "seed": req.seed, "grammar": grammar,
        "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
    }, param)
    tokenizer = await load(svc, card)
    choices = [Choice(index=i, spec=s, messages=messages, tools=req.tools or None)
               for i, s in enumerate(seeded(spec, req.n))]
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        return GenerationStream(svc, card, choices, ChatChunks(req, tokenizer, completion_id, created))
    results = await generate_all(svc, card, choices)
    out = []
    for choice, result in zip(choices, results):
        content, tool_calls, finish, logprobs = _answer(req, tokenizer, result)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        out.append({"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": out, "usage": _usage(results), "system_fingerprint": None}
