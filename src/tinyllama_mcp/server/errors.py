"""How validation errors are worded for callers (the error type itself is tinyllama_mcp.errors.UserError)."""

from __future__ import annotations

from pydantic import ValidationError


def _printable(part: object, limit: int = 60) -> str:
    """A field name as one short printable token: unknown argument names come from the caller."""
    text = str(part)
    if not text.isprintable() or not text:
        text = repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, `field: what is wrong`, without echoing the (possibly huge) input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(_printable(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if error["type"] == "extra_forbidden":
            message = "unknown argument (check the spelling against the tool's input schema)"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
