"""Constrained decoding guarantees valid output whatever the model prefers: random walks over the allowed tokens of
tiny-demo's real tokenizer always end in text that parses and validates against the schema."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline import grammars
from tinyllama_mcp.pipeline.constraint import GrammarConstraint, ll_tokenizer
from tinyllama_mcp.pipeline.tool_format import parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TICKET = {"type": "function", "function": {"name": "open_ticket", "parameters": {
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 1},
                   "labels": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                   "urgent": {"type": "boolean"},
                   "owner": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]},
                   "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["title", "urgent", "owner"], "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
                         "required": ["name"], "additionalProperties": False}}}}}
ONCALL = {"type": "function", "function": {"name": "who_is_on_call", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
TOOLS = [WEATHER, TICKET, ONCALL]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4}},
          "required": ["name", "age"], "additionalProperties": False}
CLOSERS = ('"', "}", "]", "\n", "<")
WALKS = 25


def walk(constraint: GrammarConstraint, tokenizer, rng: random.Random, max_steps: int = 1500) -> str:
    """Random allowed tokens until the grammar is done or EOS is chosen; after a while closing tokens and EOS are
    preferred (as a model's would be), so unbounded strings end; half the walks start with '<' where allowed (a call
    in 'auto'). Returns the decoded text."""
    ids = []
    for step in range(max_steps):
        if constraint.done:
            break
        allowed = constraint.allowed()
        assert allowed.shape == (constraint.vocab_size,) and allowed.dtype == torch.bool
        choices = allowed.nonzero().flatten().tolist()
        assert choices, "the grammar allows no token: the request could not go on"
        eos = tokenizer.eos_token_id
        if eos in choices and rng.random() < (0.3 if step < 40 else 0.6):
            break
        if step == 0 and rng.random() < 0.5:
            choices = [c for c in choices if tokenizer.decode([c]).startswith("<")] or choices
        choices = [c for c in choices if c != eos] or choices
        if step > 40 and rng.random() < 0.7:
            closing = [c for c in choices if tokenizer.decode([c]).startswith(CLOSERS)]
            choices = closing or choices
        token = rng.choice(choices)
        constraint.advance(token)
        ids.append(token)
    else:
        raise AssertionError(f"no end after {max_steps} tokens: {tokenizer.decode(ids)!r}")
    assert constraint.accepting
    return tokenizer.decode(ids)


def check_calls(text: str, allowed_names: set[str], most: int = 99) -> list[dict]:
    content, calls = parse_tool_calls(text)
    assert content is None and 1 <= len(calls) <= most, text
    for call in calls:
        assert call["name"] in allowed_names
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    return calls


@pytest.mark.parametrize("seed", range(3))
def test_required_calls_always_parse_and_validate(tokenizer, seed):
    rng = random.Random(seed)
    grammar = grammars.chat_grammar(TOOLS, "required", True)
    counts = []
    for _ in range(WALKS):
        text = walk(GrammarConstraint(grammar, tokenizer, len(tokenizer)), tokenizer, rng)
        counts.append(len(check_calls(text, set(PARAMETERS))))
    assert max(counts) > 1  # parallel calls happen


def test_auto_is_valid_text_or_valid_calls(tokenizer):
    rng = random.Random(7)
    grammar = grammars.chat_grammar(TOOLS, "auto", True)
    kinds = set()
    for _ in range(WALKS * 2):
        text = walk(GrammarConstraint(grammar, tokenizer, len(tokenizer)), tokenizer, rng)
        if text.startswith("<"):
            check_calls(text, set(PARAMETERS))
            kinds.add("calls")
        else:
            assert text and "<tool_call>" not in text and parse_tool_calls(text) == (text, [])
            kinds.add("text")
    assert kinds == {"calls", "text"}


def test_named_function_single_call(tokenizer):
    rng = random.Random(3)
    grammar = grammars.chat_grammar(TOOLS, {"type": "function", "function": {"name": "open_ticket"}}, True)
    for _ in range(WALKS):
        constraint = GrammarConstraint(grammar, tokenizer, len(tokenizer))
        text = walk(constraint, tokenizer, rng)
        assert [c["name"] for c in check_calls(text, {"open_ticket"}, most=1)] == ["open_ticket"]
        assert constraint.done  # nothing may follow the one call: the engine stops without waiting for EOS


@pytest.mark.parametrize("response_format, schema", [
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
])
def test_structured_output_always_validates(tokenizer, response_format, schema):
    rng = random.Random(11)
    grammar = grammars.chat_grammar(None, "auto", True, response_format)
    for _ in range(WALKS):
        constraint = GrammarConstraint(grammar, tokenizer, len(tokenizer))
        text = walk(constraint, tokenizer, rng)
        jsonschema.validate(json.loads(text), schema)
        assert constraint.done


def test_eos_only_where_the_grammar_may_end(tokenizer):
    grammar = grammars.chat_grammar(TOOLS, "auto", True)
    constraint = GrammarConstraint(grammar, tokenizer, len(tokenizer))
    eos = tokenizer.eos_token_id
    assert not constraint.allowed()[eos]  # an empty turn is not an answer
    for token in tokenizer("Hi", add_special_tokens=False)["input_ids"]:
        constraint.advance(token)
    assert constraint.allowed()[eos] and constraint.accepting and not constraint.done
    constraint.advance(eos)
    assert constraint.done

    calls = GrammarConstraint(grammar, tokenizer, len(tokenizer))
    text = '<tool_call>\n{"name": "who_is_on_call", "arguments": {}}\n</tool_call>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in ids[:-1]:
        calls.advance(token)
        assert not calls.allowed()[eos]  # never inside a call
    calls.advance(ids[-1])
    allowed = calls.allowed()
    assert allowed[eos] and not calls.done  # another call may follow
    assert {tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist() if t != eos} <= {"\n"}


def test_role_tags_and_padding_are_never_allowed(tokenizer):
    """tiny-demo's special tokens (<|user|> and the like) never appear inside constrained output."""
    constraint = GrammarConstraint(grammars.chat_grammar(TOOLS, "auto", True), tokenizer, len(tokenizer))
    allowed = constraint.allowed()
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<pad>", "<unk>", "<s>"):
        assert not allowed[tokenizer.convert_tokens_to_ids(token)]


def test_rows_past_the_tokenizer_are_never_allowed(tokenizer):
    vocab = len(tokenizer) + 37  # a model whose lm_head is padded past the tokenizer
    constraint = GrammarConstraint(grammars.chat_grammar(None, "auto", True, {"type": "json_object"}), tokenizer, vocab)
    allowed = constraint.allowed()
    assert allowed.shape == (vocab,) and not allowed[len(tokenizer):].any() and allowed.any()


def test_a_disallowed_token_is_refused(tokenizer):
    constraint = GrammarConstraint(grammars.chat_grammar(None, "auto", True, {"type": "json_object"}), tokenizer,
                                   len(tokenizer))
    (x,) = tokenizer("x", add_special_tokens=False)["input_ids"]
    assert not constraint.allowed()[x]
    with pytest.raises(ValueError, match="not allowed by the grammar"):
        constraint.advance(x)


def test_an_invalid_grammar_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="the output grammar is invalid"):
        GrammarConstraint("start: nowhere", tokenizer, len(tokenizer))


def test_the_llguidance_tokenizer_is_built_once_per_tokenizer(tokenizer):
    assert ll_tokenizer(tokenizer) is ll_tokenizer(tokenizer)
