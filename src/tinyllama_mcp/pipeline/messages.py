"""Chat messages as requests and training rows hold them (OpenAI's shapes), checked and cleaned, torch-free.

Roles system/user/assistant/tool; an assistant turn may carry `tool_calls` (its content then may be null), each
answered by a `tool` message; a row may carry `tools`. Problems are ValueErrors naming the row and what to fix
(pipeline.data turns them into one-line UserErrors).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.grammars import check_tools
from tinyllama_mcp.pipeline.tool_format import dumps

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


def _content_text(value: Any, where: str, i: int, optional: bool) -> str:
    """A message's content as a string: a string, or OpenAI's list of text parts joined; None only if `optional`."""
    if isinstance(value, str):
        return value
    if value is None and optional:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError(f"{where}: message {i} content must be a string" + (" (or null with tool_calls)" if optional else ""))


def _check_tool_calls(calls: Any, where: str, i: int) -> list[dict]:
    """An assistant turn's OpenAI tool_calls, with the arguments rewritten as compact JSON (what the grammars make)."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: message {i} tool_calls must be a non-empty list of "
                         '{"id", "type": "function", "function": {"name", "arguments"}} objects')
    clean = []
    for j, call in enumerate(calls):
        at = f"{where}: message {i} tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise ValueError(f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}')
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at} needs function.name (a string)")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"{at} arguments are not valid JSON ({exc.msg}); write them as a JSON object string") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{at} arguments must be a JSON object (as a string, like OpenAI's)")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ValueError(f"{at} id must be a string")
        clean.append({**({"id": call["id"]} if call.get("id") is not None else {}), "type": "function",
                      "function": {"name": name, "arguments": dumps(arguments)}})
    return clean


def _clean_message(m: Any, where: str, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
    role = ROLE_ALIASES.get(m["role"], m["role"])
    if role not in ROLES:
        raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {list(ROLES)}")
    calls = m.get("tool_calls") if role == "assistant" else None
    clean = {"role": role, "content": _content_text(m.get("content"), where, i, optional=bool(calls))}
    if calls:
        clean["tool_calls"] = _check_tool_calls(calls, where, i)
    if role == "tool" and m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise ValueError(f"{where}: message {i} tool_call_id must be a string")
        clean["tool_call_id"] = m["tool_call_id"]
    return clean


def _check_order(clean: list[dict], where: str) -> list[dict]:
    """An optional system turn, then user and assistant alternating, starting with user; an assistant turn with
    tool_calls is followed by its tool results (one per call at most), then by an assistant turn. Returns the turns."""
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    expected: tuple[str, ...] = ("user",)
    calls: list[dict] = []
    answered = 0
    for i, m in enumerate(turns):
        if m["role"] not in expected:
            wanted = " or ".join(repr(e) for e in expected)
            raise ValueError(
                f"{where}: roles out of order (turn {i + 1} is {m['role']!r}, expected {wanted}); "
                "use an optional system turn, then user and assistant alternating (an assistant turn with "
                "tool_calls is followed by one tool message per call, then an assistant turn)"
            )
        if m["role"] == "tool":
            answered += 1
            ids = {c["id"] for c in calls if "id" in c}
            if answered > len(calls) or (ids and "tool_call_id" in m and m["tool_call_id"] not in ids):
                raise ValueError(f"{where}: tool message (turn {i + 1}) answers no tool call of the assistant turn "
                                 f"before it (its calls: {sorted(ids)}); give each tool message the tool_call_id of "
                                 "one call")
            expected = ("tool", "assistant")
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls, answered, expected = m["tool_calls"], 0, ("tool",)
        else:
            expected = ("assistant",) if m["role"] == "user" else ("user",)
    return turns


def check_messages(messages: Any, where: str, need_final_assistant: bool) -> list[dict]:
    """Chat messages checked and cleaned: roles system/user/assistant/tool (OpenAI's 'developer' is 'system'),
    string content (text parts joined), assistant tool_calls and tool results in order. Raises ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean = [_clean_message(m, where, i) for i, m in enumerate(messages)]
    turns = _check_order(clean, where)
    if need_final_assistant and (not turns or turns[-1]["role"] != "assistant"):
        raise ValueError(f"{where}: the conversation must end with an assistant turn to train on")
    return clean


def check_row_tools(row: dict, messages: list[dict], where: str) -> Optional[str]:
    """A row's `tools` (a list, or a JSON string of one, or absent) checked against its calls; as a JSON string."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: 'tools' is a string but not JSON ({exc.msg}); give a list of tools") from None
    if not tools:
        return None
    try:
        check_tools(tools)
    except UserError as exc:
        raise ValueError(f"{where}: {exc}") from None
    names = {t["function"]["name"] for t in tools}
    for m in messages:
        for call in m.get("tool_calls", ()):
            if call["function"]["name"] not in names:
                raise ValueError(f"{where}: an assistant turn calls {call['function']['name']!r}, which is not in "
                                 f"the row's tools {sorted(names)}; add its definition or fix the name")
    return dumps(tools)
