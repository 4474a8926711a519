"""Tool calls and structured output through /v1: the `openai` client (plain and streamed), the OpenAI Agents SDK
(a function-tool round trip and a pydantic output_type) and LangChain's ChatOpenAI.bind_tools.

tiny-demo has random weights and cannot reason: that it still answers with calls and JSON that parse and match
their schemas is what constrained decoding guarantees."""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from tests.server.openai_api.conftest import TOKEN

os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"  # the Agents SDK would otherwise try to upload traces

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for two days?"}]


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: Literal["Paris", "Tokyo"]
    days: int


def _check_call(call, name: str = "get_weather") -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name == name
    arguments = json.loads(call.function.arguments)
    if name == "get_weather":
        WeatherArgs.model_validate(arguments)
        assert 1 <= arguments["days"] <= 7
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_are_valid(openai_client, tool_choice):
    out = openai_client.chat.completions.create(model="tiny-demo", messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice=tool_choice, parallel_tool_calls=False,
                                                max_tokens=80, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false: one call at most
    if isinstance(tool_choice, dict):
        _check_call(choice.message.tool_calls[0])
    else:
        _check_call(choice.message.tool_calls[0], choice.message.tool_calls[0].function.name)


def test_sampled_tool_calls_stay_valid(openai_client):
    out = openai_client.chat.completions.create(model="tiny-demo", messages=ASK, tools=[WEATHER], n=4, seed=1,
                                                tool_choice="required", max_tokens=120, temperature=1.0)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        ids = [call.id for call in choice.message.tool_calls]
        assert len(set(ids)) == len(ids)
        for call in choice.message.tool_calls:
            _check_call(call)


def test_tool_choice_none_and_auto(openai_client):
    none = openai_client.chat.completions.create(model="tiny-demo", messages=ASK, tools=[WEATHER], tool_choice="none",
                                                 max_tokens=10, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    auto = openai_client.chat.completions.create(model="tiny-demo", messages=ASK, tools=[WEATHER], max_tokens=60,
                                                 temperature=0)
    message = auto.choices[0].message
    if message.tool_calls:  # auto: either plain text or valid calls
        assert auto.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            _check_call(call)
    else:
        assert not message.content.lstrip().startswith("<tool_call>")


def test_streamed_tool_calls(openai_client):
    kwargs = dict(model="tiny-demo", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
                  temperature=0)
    plain = openai_client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    chunks = list(openai_client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    for chunk in chunks:
        delta = chunk.choices[0].delta
        assert not delta.content  # a tool-call turn is no content
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
            if part.id:
                assert call["id"] is None and part.type == "function" and part.function.name
                call["id"], call["name"] = part.id, part.function.name
            call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_results_in_history(openai_client):
    first = openai_client.chat.completions.create(model="tiny-demo", messages=ASK, tools=[WEATHER],
                                                  tool_choice="required", max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}]
    second = openai_client.chat.completions.create(model="tiny-demo", messages=history, tools=[WEATHER],
                                                   tool_choice="none", max_tokens=8, temperature=0)
    assert second.choices[0].message.content is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_response_formats(openai_client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confident": {"type": "boolean"}},
              "required": ["answer", "confident"], "additionalProperties": False}
    out = openai_client.chat.completions.create(
        model="tiny-demo", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"answer", "confident"} and value["answer"] in ("yes", "no")
    assert isinstance(value["confident"], bool) and out.choices[0].finish_reason == "stop"
    streamed = openai_client.chat.completions.create(
        model="tiny-demo", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content
    # any JSON object: unbounded, so a random model may run out of tokens inside a string; every one that ends parses
    loose = openai_client.chat.completions.create(
        model="tiny-demo", messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=200, temperature=1.0,
        seed=0, n=8, response_format={"type": "json_object"})
    ended = [c.message.content for c in loose.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    assert all(c.message.content.startswith("{") for c in loose.choices)


def test_bad_tools_are_400_naming_the_field(openai_client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as bad_name:
        openai_client.chat.completions.create(model="tiny-demo", messages=ASK, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}])
    assert bad_name.value.body["param"] == "tools" and "tools[0].function.name" in bad_name.value.body["message"]
    with pytest.raises(BadRequestError) as unknown:
        openai_client.chat.completions.create(model="tiny-demo", messages=ASK, max_tokens=4, tools=[WEATHER],
                                              tool_choice={"type": "function", "function": {"name": "nope"}})
    assert unknown.value.body["param"] == "tool_choice"
    with pytest.raises(BadRequestError) as fmt:
        openai_client.chat.completions.create(model="tiny-demo", messages=ASK, max_tokens=4,
                                              response_format={"type": "yaml"})
    assert fmt.value.body["param"] == "response_format"


# --------------------------------------------------------------------------- the Agents SDK
def _agents_model(v1_server):
    from agents import OpenAIChatCompletionsModel
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=v1_server.v1, api_key=TOKEN, max_retries=0)
    return OpenAIChatCompletionsModel(model="tiny-demo", openai_client=client)


async def test_agents_sdk_function_tool_round_trip(v1_server):
    from agents import Agent, ModelSettings, Runner, function_tool

    called: list[tuple[str, int]] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Tokyo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather in a city for some days."""
        called.append((city, days))
        return f"Sunny in {city} for {days} days."

    agent = Agent(name="weather", instructions="Use the tools to answer.", tools=[get_weather],
                  model=_agents_model(v1_server),
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=150))
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert len(called) >= 1 and called[0][0] in ("Paris", "Tokyo") and isinstance(called[0][1], int)
    # the tool's result went back to the model, which answered (tool_choice is reset to auto after a call)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str)


async def test_agents_sdk_structured_output(v1_server):
    from agents import Agent, ModelSettings, Runner

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        confident: bool

    agent = Agent(name="judge", instructions="Answer the question.", output_type=Verdict,
                  model=_agents_model(v1_server), model_settings=ModelSettings(temperature=0, max_tokens=60))
    result = await Runner.run(agent, "Is the sky blue?", max_turns=2)
    assert isinstance(result.final_output, Verdict)


# --------------------------------------------------------------------------- LangChain
def test_langchain_bind_tools(v1_server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["Paris", "Tokyo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather in a city for some days."""
        return "sunny"

    llm = ChatOpenAI(model="tiny-demo", base_url=v1_server.v1, api_key=TOKEN, temperature=0, max_tokens=80,
                     max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="any")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        WeatherArgs.model_validate(call["args"])
    merged = None
    for chunk in bound.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]
