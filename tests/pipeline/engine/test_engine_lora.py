"""Several LoRA adapters of one base in one batch: each row gets its own adapter's output, as PEFT computes it."""

from __future__ import annotations

import pytest
import torch

from engine_testlib import PROMPTS, encode, hf_greedy
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def served(tiny_demo, tokenizer):
    """An engine over tiny-demo's base with two random adapters (different ranks and targets) added."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32).eval()
    engine = Engine(base, tokenizer, EngineConfig(max_batch=4, max_len=128, chunk=3))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                           adapter_name="one")
    model.add_adapter("two", LoraConfig(r=4, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.eval()
    engine.add_adapter("one", model)
    engine.add_adapter("two", model)
    yield engine, model
    engine.close()


def peft_greedy(model, tokenizer, ids, adapter, n):
    if adapter is None:
        with model.disable_adapter():
            return hf_greedy(model, tokenizer, ids, n)
    model.set_adapter(adapter)
    return hf_greedy(model, tokenizer, ids, n)


def test_each_row_gets_its_adapter_in_one_batch(served, tokenizer):
    engine, model = served
    ids = encode(tokenizer, PROMPTS[0])
    expected = {name: peft_greedy(model, tokenizer, ids, name, 10) for name in (None, "one", "two")}
    assert len({tuple(v) for v in expected.values()}) == 3, "the adapters should change the output"
    handles = {name: engine.submit(ids, SamplingParams(max_new_tokens=10, adapter=name, ignore_eos=True))
               for name in (None, "one", "two")}
    got = {name: h.result(timeout=60).token_ids for name, h in handles.items()}
    for name in expected:
        assert got[name] == expected[name][: len(got[name])], name


def test_adapters_in_step_by_step_rows_and_prompt_scores(served, tokenizer):
    engine, model = served
    ids = encode(tokenizer, PROMPTS[3])
    model.set_adapter("two")
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    result = engine.generate(ids, SamplingParams(max_new_tokens=3, adapter="two", logprobs=1, prompt_logprobs=0,
                                                 ignore_eos=True))
    for i in range(1, len(ids)):
        assert result.prompt_logprobs[i].logprob == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
    assert result.token_ids == peft_greedy(model, tokenizer, ids, "two", 3)


def test_an_unknown_adapter_is_refused(served, tokenizer):
    engine, _ = served
    with pytest.raises(UserError, match="not loaded"):
        engine.submit(encode(tokenizer, "Hi"), SamplingParams(max_new_tokens=2, adapter="nope"))
