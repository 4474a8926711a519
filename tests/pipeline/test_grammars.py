"""The grammars of tool calls and structured output: what they accept and refuse, and their clear errors.

Acceptance is checked with llguidance's matcher over tiny-demo's real tokenizer: a text matches when its tokens are
all accepted and the grammar may end there.
"""

from __future__ import annotations

import pytest

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline import grammars
from tinyllama_mcp.pipeline.tool_format import render_tool_call

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}}
ONCALL = {"type": "function", "function": {"name": "who_is_on_call"}}  # no parameters: any object
REFS = {"type": "function", "function": {"name": "plan", "parameters": {
    "type": "object", "properties": {"step": {"$ref": "#/$defs/step"}}, "required": ["step"],
    "$defs": {"step": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                       "additionalProperties": False}}}}}
TOOLS = [WEATHER, ONCALL]
PARIS = render_tool_call("get_weather", {"city": "Paris"})
ONCALL_CALL = render_tool_call("who_is_on_call", {})


@pytest.fixture(scope="module")
def matches(tokenizer):
    from llguidance import LLMatcher

    from tinyllama_mcp.pipeline.constraint import ll_tokenizer

    lltok = ll_tokenizer(tokenizer)

    def match(grammar: str, text: str) -> bool:
        matcher = LLMatcher(lltok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        ok = matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ok and matcher.is_accepting()

    return match


def test_nothing_to_constrain_is_none():
    assert grammars.tool_call_grammar(None, "auto", True) is None
    assert grammars.tool_call_grammar([], None, True) is None
    assert grammars.tool_call_grammar(TOOLS, "none", True) is None
    assert grammars.response_format_grammar(None) is None
    assert grammars.response_format_grammar({"type": "text"}) is None
    assert grammars.chat_grammar(TOOLS, "none", True, {"type": "text"}) is None


def test_auto_is_text_or_calls(matches):
    g = grammars.chat_grammar(TOOLS, "auto", True)
    assert matches(g, "It is sunny.\nMore lines <b>.")
    assert matches(g, PARIS) and matches(g, PARIS + "\n" + ONCALL_CALL)
    assert not matches(g, "")  # not an empty turn
    assert not matches(g, "<b>bold</b>")  # '<' starts a call
    assert not matches(g, "Let me check. " + PARIS)  # text or calls, not both: a call in text escapes its schema
    assert matches(g, "Text may mention <tool_call without the marker.")
    assert not matches(g, PARIS.replace('"name": ', '"name":'))  # json.dumps' spacing, as in training
    assert not matches(g, render_tool_call("get_time", {}))  # unknown function
    assert not matches(g, render_tool_call("get_weather", {"town": "Paris"}))  # against the schema
    assert not matches(g, render_tool_call("get_weather", {"city": "Paris", "days": 0}))
    assert matches(g, render_tool_call("get_weather", {"city": "Paris", "days": 3}))
    assert matches(g, render_tool_call("who_is_on_call", {"anything": [1, None]}))


def test_required_named_and_single(matches):
    required = grammars.chat_grammar(TOOLS, "required", True)
    assert not matches(required, "It is sunny.")
    assert matches(required, PARIS) and matches(required, PARIS + "\n" + PARIS)
    named = grammars.chat_grammar(TOOLS, {"type": "function", "function": {"name": "who_is_on_call"}}, True)
    assert matches(named, ONCALL_CALL)
    assert not matches(named, PARIS) and not matches(named, ONCALL_CALL + "\n" + ONCALL_CALL)
    assert not matches(named, "text")
    single = grammars.chat_grammar(TOOLS, "auto", False)
    assert matches(single, PARIS) and matches(single, "text")
    assert not matches(single, PARIS + "\n" + ONCALL_CALL)
    assert not matches(grammars.chat_grammar(TOOLS, "required", False), PARIS + "\n" + PARIS)


def test_local_refs_of_parameters_still_resolve(matches):
    g = grammars.chat_grammar([REFS], "required", True)
    assert matches(g, render_tool_call("plan", {"step": {"n": 2}}))
    assert not matches(g, render_tool_call("plan", {"step": {"n": "two"}}))


def test_response_format(matches):
    obj = grammars.response_format_grammar({"type": "json_object"})
    assert matches(obj, '{"a": [1, 2], "b": {"c": null}}') and matches(obj, "{}")
    assert not matches(obj, "[1]") and not matches(obj, "hello") and not matches(obj, ' {"a": 1}')
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    strict = grammars.response_format_grammar({"type": "json_schema",
                                               "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert matches(strict, '{"name": "Ada", "age": 36}')
    assert not matches(strict, '{"name": "Ada"}') and not matches(strict, '{"age": 36, "name": "Ada"}')


def test_tools_with_a_response_format(matches):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    g = grammars.chat_grammar(TOOLS, "auto", True, {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert matches(g, '{"answer": "sunny"}') and matches(g, PARIS)
    assert not matches(g, "sunny")
    only_json = grammars.chat_grammar(TOOLS, "none", True, {"type": "json_object"})
    assert matches(only_json, "{}") and not matches(only_json, PARIS)


@pytest.mark.parametrize("tools, expected", [
    ("get_weather", "'tools' must be a list"),
    ([{"type": "retrieval"}], "only function tools are supported"),
    ([{"type": "function", "function": {"name": "get weather"}}], "1-64 letters, digits"),
    ([WEATHER, WEATHER], "two tools are named 'get_weather'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "schema of an object"),
])
def test_bad_tools(tools, expected):
    with pytest.raises(UserError, match=expected):
        grammars.chat_grammar(tools, "auto", True)


@pytest.mark.parametrize("tool_choice, tools, expected", [
    ("always", TOOLS, "tool_choice 'always' is not supported"),
    ({"type": "function", "function": {"name": "get_time"}}, TOOLS, "'get_time', which is not in 'tools'"),
    ({"type": "function"}, TOOLS, "tool_choice must be"),
    ("required", None, "no 'tools' are given"),
])
def test_bad_tool_choice(tool_choice, tools, expected):
    with pytest.raises(UserError, match=expected):
        grammars.chat_grammar(tools, tool_choice, True)


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "xml"}, "type 'xml' is not supported"),
    ({"type": "json_schema"}, "needs {\"json_schema\""),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}, "strict": True}},
     "the response_format schema cannot be used for constrained decoding: Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}},
     "look-around"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "foo"}, "strict": True}},
     "Unknown format: foo"),
])
def test_bad_response_format(response_format, expected):
    with pytest.raises(UserError, match=expected) as caught:
        grammars.chat_grammar(None, "auto", True, response_format)
    assert "\n" not in str(caught.value)


def test_strict_off_ignores_unsupported_keywords(matches):
    schema = {"type": "string", "format": "foo"}
    g = grammars.chat_grammar(None, "auto", True, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert matches(g, '"anything"')


def test_a_bad_parameters_schema_names_its_tool():
    bad = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}
    with pytest.raises(UserError, match=r"parameters schema of tools\[1\] \(function 'f'\).*Pointer '/nope' does not exist"):
        grammars.chat_grammar([WEATHER, bad], "auto", True)
