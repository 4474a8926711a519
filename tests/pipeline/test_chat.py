"""The chat template: render() equals the Jinja template for every message shape, rows without tools render as
before tools existed, and the tool-call text is inside the assistant (trained) part."""

from __future__ import annotations

import json

import pytest

from tinyllama_mcp.pipeline.chat import CHAT_TEMPLATE, render
from tinyllama_mcp.pipeline.tool_format import parse_tool_calls

# The template before tools, verbatim: rows without tools must render exactly so.
TEMPLATE_BEFORE_TOOLS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now — in °C, 'quoted'",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ONCALL = {"type": "function", "function": {"name": "who_is_on_call", "parameters": {"type": "object", "properties": {}}}}
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Weather in Paris?\nAnd \"Nice\"?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
TWO_CALLS = {"role": "assistant", "content": "Checking both.", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Nice"}}},
    {"id": "c2", "type": "function", "function": {"name": "who_is_on_call", "arguments": "{}"}}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}
RESULT2 = {"role": "tool", "tool_call_id": "c2", "content": "Dana"}
ANSWER = {"role": "assistant", "content": "Sunny, 21 °C."}

PLAIN_SHAPES = [
    [USER],
    [SYSTEM, USER],
    [USER, ANSWER],
    [SYSTEM, USER, ANSWER, USER],
    [{"role": "system", "content": ""}, USER, {"role": "assistant", "content": ""}],
]
TOOL_SHAPES = [
    [USER, CALL],
    [SYSTEM, USER, CALL, RESULT, ANSWER],
    [USER, TWO_CALLS, RESULT, RESULT2],
    [{"role": "system", "content": ""}, USER, CALL, RESULT],
    [SYSTEM, USER, ANSWER, USER, TWO_CALLS, RESULT, RESULT2, ANSWER],
    [USER, {**CALL, "content": ""}, RESULT, ANSWER],
]


def template_text(tokenizer, messages, tools=None, add_generation_prompt=False, template=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template,
                                         add_generation_prompt=add_generation_prompt)


def test_tiny_demo_and_loaded_tokenizers_carry_the_template(tiny_demo, tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer.chat_template == CHAT_TEMPLATE  # modeling.load_tokenizer: what training and serving use
    assert AutoTokenizer.from_pretrained(tiny_demo).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", PLAIN_SHAPES)
def test_rows_without_tools_render_as_before(tokenizer, messages, add_generation_prompt):
    before = template_text(tokenizer, messages, None, add_generation_prompt, TEMPLATE_BEFORE_TOOLS)
    assert template_text(tokenizer, messages, None, add_generation_prompt) == before
    assert template_text(tokenizer, messages, [], add_generation_prompt) == before
    assert render(messages, add_generation_prompt) == before


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("tools", [None, [WEATHER], [WEATHER, ONCALL]])
@pytest.mark.parametrize("messages", PLAIN_SHAPES + TOOL_SHAPES)
def test_render_equals_the_template(tokenizer, messages, tools, add_generation_prompt):
    expected = template_text(tokenizer, messages, tools, add_generation_prompt)
    assert render(messages, add_generation_prompt, tools=tools) == expected


def test_tools_go_into_the_system_turn(tokenizer):
    text = template_text(tokenizer, [SYSTEM, USER], [WEATHER], True)
    assert text.startswith("<|system|>\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert text.count("<|system|>") == 1 and text.endswith("<|user|>\n" + USER["content"] + "</s>\n<|assistant|>\n")
    made = template_text(tokenizer, [USER], [WEATHER], True)  # no system turn: one is made for the tools
    assert made.startswith("<|system|>\n# Tools\n") and made.count("</s>") == 2


def test_tool_calls_and_results_are_rendered(tokenizer):
    text = template_text(tokenizer, [USER, TWO_CALLS, RESULT, RESULT2], [WEATHER, ONCALL])
    turn = text.split("<|assistant|>\n", 1)[1].split("</s>", 1)[0]
    assert turn == ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>'
                    '\n<tool_call>\n{"name": "who_is_on_call", "arguments": {}}\n</tool_call>')
    assert parse_tool_calls(turn) == ("Checking both.", [{"name": "get_weather", "arguments": '{"city": "Nice"}'},
                                                         {"name": "who_is_on_call", "arguments": "{}"}])
    assert text.endswith('<|tool|>\n{"temp": 21}</s>\n<|tool|>\nDana</s>\n')


def test_the_tool_call_text_is_in_the_assistant_mask(tokenizer):
    """TRL's assistant-only loss reads the {% generation %} markers: the calls are trained on, the results not."""
    messages = [SYSTEM, USER, CALL, RESULT, ANSWER]
    out = tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call></s>'
                       "Sunny, 21 °C.</s>")
