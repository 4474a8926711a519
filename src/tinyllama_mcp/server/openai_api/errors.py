"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, and which status each failure gets.

Clients (the openai library, LangChain, the Agents SDK) pick their exception class from the status code and
show `message`; `param` names the request field at fault.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

from pydantic import ValidationError

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.errors import describe_validation_error

log = logging.getLogger("tinyllama_mcp")

# status -> (type, default code), as OpenAI words them
_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
}


class OpenAIError(Exception):
    """A failure to answer with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else _KINDS.get(status, _KINDS[500])[1]

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    kind, default_code = _KINDS.get(status, _KINDS[500])
    return {"error": {"message": message, "type": kind, "param": param, "code": code if code is not None else default_code}}


def error_bytes(status: int, message: str, **kwargs: Any) -> bytes:
    return json.dumps(error_body(status, message, **kwargs)).encode()


def param_of(loc: tuple) -> Optional[str]:
    """A pydantic error location as OpenAI writes `param`: messages[0].content."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def from_validation(exc: ValidationError) -> OpenAIError:
    errors = exc.errors(include_url=False, include_input=False)
    param = param_of(tuple(errors[0]["loc"])) if errors else None
    return OpenAIError(400, f"invalid request: {describe_validation_error(exc)}", param=param)


def from_generation(exc: BaseException, param: Optional[str] = None) -> OpenAIError:
    """What a generation call raised, as the status a client should see."""
    if isinstance(exc, OpenAIError):
        return exc
    # The engine (torch) is imported only once a model was loaded; before that nothing can be EngineFull.
    scheduler = sys.modules.get("tinyllama_mcp.pipeline.engine.scheduler")
    if scheduler is not None and isinstance(exc, scheduler.EngineFull):
        return OpenAIError(429, str(exc))
    if isinstance(exc, UserError):
        return OpenAIError(400, str(exc), param=param)
    log.error("a /v1 generation failed", exc_info=exc)
    return OpenAIError(500, f"the server failed to generate ({type(exc).__name__}); see the server log")
