"""The tool-call format: what the template writes is what parse_tool_calls reads back."""

from __future__ import annotations

import json

import pytest

from tinyllama_mcp.pipeline.tool_format import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    may_start_tool_calls,
    parse_tool_calls,
    render_tool_call,
    render_tool_calls,
)


def test_render_is_the_hermes_block():
    assert render_tool_call("get_weather", {"city": "Paris"}) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    # OpenAI's arguments are a JSON string: written verbatim.
    assert render_tool_call("f", '{"a": 1}') == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'


@pytest.mark.parametrize("content", [None, "", "Let me check."])
def test_round_trip(content):
    calls = [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
             {"name": "who_is_on_call", "arguments": {}}]
    text = render_tool_calls(content, calls)
    parsed_content, parsed = parse_tool_calls(text)
    assert parsed_content == (content or None)
    assert parsed == [{"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                      {"name": "who_is_on_call", "arguments": "{}"}]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in parsed)


def test_plain_text_is_content():
    assert parse_tool_calls("Hello.") == ("Hello.", [])
    assert parse_tool_calls("  ") == (None, [])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>',  # cut-off JSON
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\nnope\n</tool_call>',
])
def test_malformed_blocks_leave_everything_as_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_arguments_given_as_a_json_string_are_accepted():
    text = f'{TOOL_CALL_START}\n{{"name": "f", "arguments": "{{\\"a\\": 1}}"}}\n{TOOL_CALL_END}'
    assert parse_tool_calls(text) == (None, [{"name": "f", "arguments": '{"a": 1}'}])


def test_an_unclosed_block_is_not_a_call():
    text = '<tool_call>\n{"name": "f", "arguments": {}}'
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("prefix, expected", [
    ("", False), ("<", True), ("<tool", True), ("<tool_call>\n{", True), ("Hi", False), ("<b>", False),
])
def test_may_start_tool_calls(prefix, expected):
    assert may_start_tool_calls(prefix) is expected
