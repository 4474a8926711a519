"""The tool-call format of the chat template (Hermes style), torch-free.

An assistant turn that calls tools holds one block per call, blocks separated by a newline:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The chat template (pipeline.chat) writes calls this way, the grammars (pipeline.grammars) force the model to write
them this way, and `parse_tool_calls` reads them back into OpenAI's `{"name", "arguments"}` (arguments a JSON string).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_ROLE_TAG = "<|tool|>"
# Compact JSON as json.dumps writes it by default: what training rows hold and what the grammars enforce.
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "

_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"\n?(.*?)\n?" + re.escape(TOOL_CALL_END), re.DOTALL)


def dumps(value: Any) -> str:
    """JSON as the template's `tojson` filter writes it (transformers: ensure_ascii=False, default separators)."""
    return json.dumps(value, ensure_ascii=False)


def arguments_text(arguments: Any) -> str:
    """A call's arguments as written in the block: a JSON string verbatim (OpenAI's form), anything else as JSON."""
    return arguments if isinstance(arguments, str) else dumps(arguments)


def render_tool_call(name: str, arguments: Any) -> str:
    """One call block, byte-identical to what CHAT_TEMPLATE writes for it."""
    return f'{TOOL_CALL_START}\n{{"name": {dumps(name)}, "arguments": {arguments_text(arguments)}}}\n{TOOL_CALL_END}'


def render_tool_calls(content: Optional[str], calls: list[dict]) -> str:
    """An assistant turn's text (without EOS): the content (if any), then each call's block, newline-separated.
    `calls`: OpenAI tool calls ({"function": {"name", "arguments"}}) or bare {"name", "arguments"}."""
    parts = [content] if content else []
    for call in calls:
        function = call.get("function", call)
        parts.append(render_tool_call(function["name"], function["arguments"]))
    return "\n".join(parts)


def may_start_tool_calls(text: str) -> bool:
    """Whether generated text so far is, or may become, a tool-call turn (it starts with a prefix of the marker or
    with the marker itself): a streaming client holds such text back until the turn ends."""
    stripped = text.lstrip()
    if not stripped:
        return False
    return stripped.startswith(TOOL_CALL_START) or TOOL_CALL_START.startswith(stripped)


def parse_tool_calls(text: str) -> tuple[Optional[str], list[dict[str, str]]]:
    """Split an assistant turn into (content, calls): calls as {"name", "arguments" (a JSON string)}, content the text
    outside the blocks (None when empty). A block that is not a JSON object with a string name and object arguments
    (a cut-off turn, a model without constrained decoding) makes the whole text content, with no calls."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return (text if text.strip() else None), []
    calls = []
    for block in blocks:
        try:
            body = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return text, []
        arguments = body.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return text, []
        if not isinstance(arguments, dict):
            return text, []
        calls.append({"name": body["name"], "arguments": dumps(arguments)})
    rest = _BLOCK.sub("", text).strip()
    return (rest or None), calls
