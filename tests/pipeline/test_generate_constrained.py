"""Constrained decoding end to end on the engine: tiny-demo cannot reason, yet its calls and JSON always validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tinyllama_mcp.pipeline.grammars import chat_grammar
from tinyllama_mcp.pipeline.specs import GenerationSpec
from tinyllama_mcp.pipeline.tool_format import parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture(scope="module")
def generator(tiny_demo):
    from tinyllama_mcp.pipeline.generate import load_generator

    generator = load_generator("tiny-demo")
    assert generator.engine() is not None
    yield generator
    generator.close()


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_required_tool_calls_always_parse_and_validate(generator, seed):
    spec = GenerationSpec(max_new_tokens=120, temperature=0.0 if seed is None else 1.0, seed=seed,
                          grammar=chat_grammar([WEATHER], "required", True), logprobs=0)
    result = generator.generate(messages=ASK, spec=spec, tools=[WEATHER])
    assert result.finish_reason == "stop", result.text
    content, calls = parse_tool_calls(result.text)
    assert calls and content is None
    for call in calls:
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    assert len(result.logprobs) == len(result.token_ids)


def test_json_schema_output_validates(generator):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30},
                                               "confidence": {"type": "number"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    grammar = chat_grammar(response_format={"type": "json_schema",
                                            "json_schema": {"name": "reply", "schema": schema, "strict": True}})
    result = generator.generate(messages=ASK, spec=GenerationSpec(max_new_tokens=80, temperature=0.7, seed=5,
                                                                  grammar=grammar))
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)
