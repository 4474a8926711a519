"""POST /v1/tokenize and /v1/detokenize, in vLLM's shapes.

{"model", "prompt"} or {"model", "messages"} (rendered by the chat template with the generation prompt, as chat
completions renders them) -> {"tokens", "count", "max_model_len"}; {"model", "tokens"} -> {"prompt"}.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.openai_api.errors import OpenAIError
from tinyllama_mcp.server.openai_api.listing import find_model
from tinyllama_mcp.server.openai_api.runs import load
from tinyllama_mcp.server.openai_api.schemas import DetokenizeRequest, TokenizeRequest
from tinyllama_mcp.server.services import Services


def _tokenize(svc: Services, ref: str, tokenizer, req: TokenizeRequest) -> dict[str, Any]:
    if req.prompt is not None:
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
    else:
        from tinyllama_mcp.pipeline.generate import render_input

        messages = [m.for_template() for m in req.messages or []]
        try:
            ids = render_input(tokenizer, messages, None, req.tools or None)
        except UserError as exc:
            raise OpenAIError(400, str(exc), param="messages") from None
    return {"tokens": list(ids), "count": len(ids), "max_model_len": svc.generators.max_model_len(ref)}


async def tokenize(svc: Services, req: TokenizeRequest) -> dict[str, Any]:
    card = await anyio.to_thread.run_sync(find_model, svc, req.model)
    tokenizer = await load(svc, card)
    return await anyio.to_thread.run_sync(_tokenize, svc, card.ref, tokenizer, req)


async def detokenize(svc: Services, req: DetokenizeRequest) -> dict[str, Any]:
    card = await anyio.to_thread.run_sync(find_model, svc, req.model)
    tokenizer = await load(svc, card)
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in req.tokens):
        raise OpenAIError(400, f"tokens must be ids in [0, {vocab}) for model {req.model!r}", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}
