"""SFT on function-calling rows in OpenAI's fine-tuning format (tools, assistant tool_calls, tool results), in-process
on tiny-demo: training renders the rows with the serving template, tools and calls included, and the trained adapter
then writes the trained call under constrained decoding."""

from __future__ import annotations

import json

import torch
from transformers import TrainerCallback

from tinyllama_mcp.pipeline import data
from tinyllama_mcp.pipeline.chat import render
from tinyllama_mcp.pipeline.constraint import GrammarConstraint
from tinyllama_mcp.pipeline.grammars import chat_grammar
from tinyllama_mcp.pipeline.samples import SFT_TOOLS_SAMPLE
from tinyllama_mcp.pipeline.specs import DatasetSpec
from tinyllama_mcp.pipeline.tool_format import parse_tool_calls

from pipeline_testlib import sft_demo_spec


class KeepTrainData(TrainerCallback):
    """The tokenized rows the Trainer trains on."""

    rows: list = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.rows = [list(r["input_ids"]) for r in train_dataloader.dataset]


def tool_turn_logprob(model, tokenizer, messages: list[dict], tools: list[dict]) -> float:
    """Mean log-probability of the first assistant turn (the tool call and its EOS) given the conversation before it."""
    prompt = render(messages[:-1], add_generation_prompt=True, tools=tools)
    full = render(messages, add_generation_prompt=False, tools=tools)
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    target = ids[0, 1:]
    return float(logprobs[start - 1:, :].gather(1, target[start - 1:, None]).mean())


def constrained_greedy(model, tokenizer, prompt_ids: list[int], grammar: str, max_new_tokens: int = 200) -> str:
    """Greedy decoding under the grammar, as the engine does it: mask, pick, advance, until done or EOS."""
    constraint = GrammarConstraint(grammar, tokenizer, model.config.vocab_size)
    feed, cache, new = torch.tensor([prompt_ids]), None, []
    for _ in range(max_new_tokens):
        if constraint.done:
            break
        with torch.no_grad():
            out = model(feed, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = int(out.logits[0, -1].masked_fill(~constraint.allowed(), float("-inf")).argmax())
        if token == tokenizer.eos_token_id:
            break
        constraint.advance(token)
        new.append(token)
        feed = torch.tensor([[token]])
    return tokenizer.decode(new)


def test_sft_on_function_calling_rows(tmp_path, tokenizer):
    from tinyllama_mcp.pipeline.events import EventLog, read_events
    from tinyllama_mcp.pipeline.generate import load_generator
    from tinyllama_mcp.pipeline.recipe.sft import run_sft

    rows = [json.loads(line) for line in SFT_TOOLS_SAMPLE.read_text("utf-8").splitlines()]
    spec = sft_demo_spec(SFT_TOOLS_SAMPLE, training={"max_length": 1024, "num_train_epochs": 8},
                         quant={"quantization": "none"},
                         eval_prompts={"prompts": ["Is the build on main green?"], "max_new_tokens": 8})
    keep = KeepTrainData()
    log = EventLog(tmp_path / "events.jsonl")
    summary = run_sft(spec, tmp_path, log, callbacks=[keep])
    log.close()
    events = read_events(tmp_path / "events.jsonl")
    assert {a["kind"] for a in events if a["event"] == "artifact"} == {"adapter", "eval_samples", "lineage"}
    assert not [e for e in events if e["event"] == "warning"]

    # Training saw each row exactly as the serving template renders it: tools block, calls and tool turns.
    loaded = data.load(DatasetSpec(source=str(SFT_TOOLS_SAMPLE)), "sft").rows
    expected = sorted(tokenizer(render(r["messages"], False, tools=json.loads(r["tools"])),
                                add_special_tokens=False)["input_ids"] for r in loaded)
    assert sorted(keep.rows) == expected
    assert all("<tool_call>" in tokenizer.decode(r) for r in keep.rows)

    steps = [e["loss"] for e in events if e["event"] == "step"]
    assert summary["steps"] == len(steps) and steps[-1] < 0.5 * steps[0]

    # The adapter learned the calls: their likelihood rose well above the base model's.
    base = load_generator("tiny-demo").model
    trained = load_generator(str(tmp_path / "adapter")).model
    messages, tools = rows[0]["messages"][:3], rows[0]["tools"]
    assert tool_turn_logprob(trained, tokenizer, messages, tools) > tool_turn_logprob(base, tokenizer, messages, tools) + 1

    # Served with its tools under constrained decoding, it writes a valid call of the trained function.
    prompt = render(messages[:2], add_generation_prompt=True, tools=tools)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # 'auto': calling is the model's choice (a random model starts with text); the function is learned too.
    text = constrained_greedy(trained, tokenizer, prompt_ids, chat_grammar(tools, "auto", False))
    content, calls = parse_tool_calls(text)
    assert content is None and [c["name"] for c in calls] == ["get_build_status"], text
    assert isinstance(json.loads(calls[0]["arguments"])["branch"], str)
