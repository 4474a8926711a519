"""Grammars for constrained decoding (llguidance's Lark syntax with `%json` schemas), torch-free.

`tool_call_grammar` makes the model answer with plain text or pipeline.tool_format call blocks whose arguments match
each function's JSON schema; `response_format_grammar` makes it answer with JSON (OpenAI's `response_format`);
`chat_grammar` combines both for one chat request. JSON is compact in json.dumps' default style (", " and ": "), the
form training rows are rendered in, so a model trained on such rows is never pushed off its own format. The result is
GenerationSpec.grammar; pipeline.constraint turns it into per-token masks.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.tool_format import ITEM_SEPARATOR, KEY_SEPARATOR, TOOL_CALL_END, TOOL_CALL_START

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}
ANY_OBJECT: dict = {"type": "object"}
# Plain text that is not a tool call: not empty, not starting with '<' (the marker's first byte), and never holding
# the marker (a call inside text would escape its schema).
TEXT_RULE = "TEXT: /[^<](?s:.)*/ & ~/(?s:.*)" + TOOL_CALL_START + "(?s:.*)/"
ARGUMENTS_POINTER = "#/properties/arguments"  # where a function's parameters sit in its call's schema


# ---------------------------------------------------------------- checking inputs


def check_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}].
    Returns the list; raises UserError naming the bad tool and what to fix."""
    if not isinstance(tools, list):
        raise UserError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UserError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}}; only function tools are supported")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise UserError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-' (got {name!r})")
        if name in names:
            raise UserError(f"{where}: two tools are named {name!r}; give each function its own name")
        names.add(name)
        if "description" in function and not isinstance(function["description"], (str, type(None))):
            raise UserError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not (isinstance(parameters, dict) and parameters.get("type", "object") == "object"):
            raise UserError(f"{where}.function.parameters must be a JSON schema of an object "
                            "({\"type\": \"object\", \"properties\": {...}}); wrap other values in an object")
    return tools


def _choice(tools: list[dict], tool_choice: Any) -> tuple[str, Optional[str]]:
    """(mode, name): mode 'none', 'auto', 'required' or 'named' (then name is the function)."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise UserError(f"tool_choice {tool_choice!r} is not supported; use 'none', 'auto', 'required' or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise UserError("tool_choice must be 'none', 'auto', 'required' or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools}:
        raise UserError(f"tool_choice names function {name!r}, which is not in 'tools'; add it or name another")
    return "named", name


# ---------------------------------------------------------------- building grammars


def _rebase_refs(schema: Any, prefix: str) -> Any:
    """Local `$ref`s ("#/...") of a schema embedded at JSON pointer `prefix` of another one, pointed there."""
    if isinstance(schema, dict):
        return {k: (prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase_refs(v, prefix))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase_refs(v, prefix) for v in schema]
    return schema


def _json_rule(name: str, schema: Any, strict: bool = True) -> str:
    """A Lark rule `name: %json {...}` in the compact style; not strict: unsupported keywords are ignored."""
    if not isinstance(schema, dict):
        raise UserError("a JSON schema must be an object such as {\"type\": \"object\", \"properties\": {...}}")
    style = dict(JSON_STYLE, **({} if strict else {"lenient": True}))
    options = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
    body = {"x-guidance": {**options, **style}, **{k: v for k, v in schema.items() if k != "x-guidance"}}
    return f"{name}: %json {json.dumps(body)}"


def _call_rules(tools: list[dict], only: Optional[str]) -> list[str]:
    """Rules `call` (one block of any allowed function) and one `fn_i` per function."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        parameters = function.get("parameters") or ANY_OBJECT
        body = {
            "type": "object",
            "properties": {"name": {"const": function["name"]},
                           "arguments": _rebase_refs(parameters, ARGUMENTS_POINTER)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        rules.append(_json_rule(f"fn_{i}", body, strict=function.get("strict") is True))
        names.append(f"fn_{i}")
    marker_open, marker_close = json.dumps(TOOL_CALL_START + "\n"), json.dumps("\n" + TOOL_CALL_END)
    return [f"call: {marker_open} ({' | '.join(names)}) {marker_close}", *rules]


def _grammar(start: str, rules: list[str]) -> str:
    return "\n".join(["%llguidance {}", f"start: {start}", *rules]) + "\n"


def tool_call_grammar(tools: Optional[list[dict]], tool_choice: Any = "auto", parallel_tool_calls: Optional[bool] = True,
                      content: Optional[str] = None) -> Optional[str]:
    """The grammar of an assistant turn given OpenAI `tools`, `tool_choice`, `parallel_tool_calls`; None when
    nothing is constrained (no tools, or tool_choice 'none' with free text). 'auto': plain text (not starting with
    '<') or calls; 'required': one or more calls; a named function: exactly one call of it; parallel_tool_calls False:
    one call at most. `content`: the grammar of the text alternative instead of free text (a Lark rule named
    `content`, e.g. from response_format)."""
    if not tools and tool_choice not in (None, "none", "auto"):
        raise UserError("tool_choice asks for a tool call but no 'tools' are given; pass the tools or drop tool_choice")
    mode, name = _choice(check_tools(tools), tool_choice) if tools else ("none", None)
    text_start, text_rules = ("content", [content]) if content else ("TEXT", [TEXT_RULE])
    if mode == "none":
        return _grammar(text_start, text_rules) if content else None
    calls = "call" if parallel_tool_calls is False or mode == "named" else 'call ("\\n" call)*'
    rules = _call_rules(tools, name)
    if mode == "auto":
        return _grammar(f"{text_start} | calls", [*text_rules, f"calls: {calls}", *rules])
    return _grammar("calls", [f"calls: {calls}", *rules])


def _response_format_rule(response_format: Any) -> Optional[str]:
    """The Lark rule `content` for OpenAI `response_format`; None for text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_rule("content", ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise UserError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return _json_rule("content", spec.get("schema") or ANY_OBJECT, strict=bool(spec.get("strict")))
    raise UserError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")


def response_format_grammar(response_format: Any) -> Optional[str]:
    """The grammar for OpenAI `response_format`: None for {"type": "text"}, any JSON object for json_object, the
    schema for json_schema (strict: unsupported schema keywords are refused; else ignored)."""
    rule = _response_format_rule(response_format)
    return _grammar("content", [rule]) if rule else None


def chat_grammar(tools: Optional[list[dict]] = None, tool_choice: Any = "auto",
                 parallel_tool_calls: Optional[bool] = True, response_format: Any = None) -> Optional[str]:
    """One chat request's grammar: tool calls, with the text alternative shaped by `response_format`; checked
    (check_grammar), so a bad schema is a UserError before the request is queued. None: unconstrained."""
    grammar = tool_call_grammar(tools, tool_choice, parallel_tool_calls, content=_response_format_rule(response_format))
    if grammar is not None:
        check_grammar(grammar)
    return grammar


def _error_detail(message: str) -> str:
    """llguidance's error without its grammar listing, on one line."""
    lines = []
    for line in message.splitlines():
        if re.match(r"^\s*\d+ \|", line):
            break
        lines.append(line.strip())
    detail = " ".join(x for x in lines if x and set(x) != {"^"})
    return re.sub(r"^at \d+\(\d+\): ", "", detail).replace("failed to compile JSON schema: ", "")


def _culprit(grammar: str, message: str) -> str:
    """Which input a grammar error comes from, from the rule on the line the error names."""
    found = re.match(r"^at (\d+)\(", message)
    lines = grammar.splitlines()
    rule = lines[int(found.group(1)) - 1].split(":", 1)[0] if found and int(found.group(1)) <= len(lines) else ""
    if rule.startswith("fn_"):
        try:
            name = json.loads(lines[int(found.group(1)) - 1].split("%json ", 1)[1])["properties"]["name"]["const"]
        except (IndexError, KeyError, TypeError, ValueError):
            name = "?"
        return f"the parameters schema of tools[{rule[3:]}] (function {name!r})"
    if rule == "content":
        return "the response_format schema"
    return "the grammar"


def check_grammar(grammar: str) -> None:
    """Raise UserError when llguidance cannot compile `grammar` (Lark text or llguidance JSON): mostly an invalid
    or unsupported JSON schema, named by where it came from."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return
    message = messages[0] if messages else "unknown error"
    culprit, detail = _culprit(grammar, message), _error_detail(message)
    if culprit.startswith("the parameters"):
        detail = detail.replace(ARGUMENTS_POINTER[1:], "")  # point into the schema the caller wrote
    raise UserError(
        f"{culprit} cannot be used for constrained decoding: {detail}; fix the "
        "schema (JSON Schema draft 2020-12; no look-around in patterns, no remote $ref); unsupported keywords are "
        "ignored where 'strict' is off"
    )
