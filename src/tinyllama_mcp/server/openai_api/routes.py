"""The /v1 routes as one Starlette app, mounted beside /mcp by server.transports (behind the same HttpGuard).

Every failure answers in OpenAI's error shape: a body over TINYLLAMA_MCP_MAX_REQUEST_BYTES is a 413 (read no
further than the limit), bad JSON or a bad field a 400 naming it, an unknown path a 404, a wrong method a 405.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tinyllama_mcp.server.openai_api.chat import chat_completions
from tinyllama_mcp.server.openai_api.completions import completions
from tinyllama_mcp.server.openai_api.errors import OpenAIError, from_generation, from_validation
from tinyllama_mcp.server.openai_api.listing import list_models, retrieve_model
from tinyllama_mcp.server.openai_api.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tinyllama_mcp.server.openai_api.tokens import detokenize, tokenize
from tinyllama_mcp.server.services import Services

log = logging.getLogger("tinyllama_mcp")


def _error(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    too_big = OpenAIError(413, f"the request body is over this server's limit of {limit} bytes "
                          "(TINYLLAMA_MCP_MAX_REQUEST_BYTES)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the request body is not valid JSON; send a JSON object") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return data


def _post(svc: Services, schema: type[BaseModel], handler: Callable[[Services, Any], Awaitable[Any]]):
    async def endpoint(request: Request):
        try:
            body = await read_json(request, svc.settings.max_request_bytes)
            try:
                parsed = schema.model_validate(body)
            except ValidationError as exc:
                raise from_validation(exc) from None
            result = await handler(svc, parsed)
        except Exception as exc:
            return _error(from_generation(exc))
        return JSONResponse(result) if isinstance(result, dict) else result

    return endpoint


def build_v1_app(svc: Services) -> Starlette:
    async def models(request: Request) -> JSONResponse:
        cards = await anyio.to_thread.run_sync(list_models, svc)
        return JSONResponse({"object": "list", "data": [card.as_json() for card in cards]})

    async def model(request: Request) -> JSONResponse:
        try:
            card = await anyio.to_thread.run_sync(retrieve_model, svc, request.path_params["model_id"])
        except Exception as exc:
            return _error(from_generation(exc))
        return JSONResponse(card.as_json())

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = OpenAIError(404, f"no route {request.url.path}: this server serves /v1/models, "
                                "/v1/chat/completions, /v1/completions, /v1/tokenize and /v1/detokenize")
        elif exc.status_code == 405:
            error = OpenAIError(405, f"{request.method} is not allowed on {request.url.path}")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=error.status, headers=exc.headers)

    routes = [
        Route("/models", models, methods=["GET"]),
        Route("/models/{model_id:path}", model, methods=["GET"]),
        Route("/chat/completions", _post(svc, ChatRequest, chat_completions), methods=["POST"]),
        Route("/completions", _post(svc, CompletionRequest, completions), methods=["POST"]),
        Route("/tokenize", _post(svc, TokenizeRequest, tokenize), methods=["POST"]),
        Route("/detokenize", _post(svc, DetokenizeRequest, detokenize), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
