"""The generation engine on CPU: same greedy tokens as transformers' generate, batching, sampling, stops, bounds."""

from __future__ import annotations

import threading

import pytest
import torch

from tinyllama_mcp.pipeline.engine import Engine, EngineFull, SamplingParams
from tinyllama_mcp.errors import UserError

PROMPTS = [
    "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n",
    "Hello",
    "Explain in one sentence what a unit test is, and why teams write them before refactoring code.",
    "<|system|>\nBe brief.</s>\n<|user|>\nName a branch.</s>\n<|assistant|>\n",
]


@pytest.fixture(scope="module")
def model(tiny_demo):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=2, max_len=256, chunk=3, max_queue=16)
    yield eng
    eng.close()


def hf_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids):].tolist()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_greedy_matches_hf_generate_under_continuous_batching(model, tokenizer, engine):
    # 4 requests of different lengths and budgets through 2 slots: requests queue, join and leave
    # the running batch between steps, and rows are compacted; each must equal its own HF run.
    lengths = [24, 9, 30, 17]
    ids = [encode(tokenizer, p) for p in PROMPTS]
    handles = [engine.submit(i, SamplingParams(max_new_tokens=n)) for i, n in zip(ids, lengths)]
    for i, n, h in zip(ids, lengths, handles):
        res = h.result(120)
        assert res.token_ids == hf_greedy(model, tokenizer, i, n)
        assert res.prompt_tokens == len(i) and res.completion_tokens == len(res.token_ids)
        assert res.finish_reason in ("length", "stop")
        assert res.text == tokenizer.decode(res.token_ids, skip_special_tokens=True)


def test_reduce_attention_decode_layer_matches_hf(model, tokenizer):
    """The decode layer the GPU compiles (attention as fp32 multiply-and-sum), run eagerly: same greedy tokens."""
    eng = Engine(model, tokenizer, max_batch=2, max_len=128, chunk=3, attention="reduce")
    try:
        assert eng.info["compile_mode"] == "none" and eng.info["attention"] == "reduce"
        ids = [encode(tokenizer, p) for p in PROMPTS[:2]]
        handles = [eng.submit(i, SamplingParams(max_new_tokens=n)) for i, n in zip(ids, (18, 11))]
        for i, n, h in zip(ids, (18, 11), handles):
            assert h.result(120).token_ids == hf_greedy(model, tokenizer, i, n)
    finally:
        eng.close()


def test_compile_mode_is_checked_and_cpu_defaults_to_eager(model):
    with pytest.raises(ValueError):
        Engine(model, None, max_batch=1, max_len=64, compile_mode="fast")
    eng = Engine(model, None, max_batch=1, max_len=64)
    assert eng.info["compile_mode"] == "none" and eng.info["attention"] == "sdpa"
    eng.close()


def test_greedy_matches_hf_with_unmerged_lora_adapter(tiny_demo, tokenizer):
    """A live PEFT LoRA (random, non-zero B) on tiny-demo: the engine merges a private copy of the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS

    base = AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.eval()
    q_before = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    ids = encode(tokenizer, PROMPTS[0])
    with Engine(peft_model, tokenizer, max_batch=2, max_len=128) as eng:
        got = eng.generate(ids, SamplingParams(max_new_tokens=20)).token_ids
        assert eng.info["lora_merged_privately"]
    assert got == hf_greedy(peft_model, tokenizer, ids, 20)
    with peft_model.disable_adapter():
        plain = hf_greedy(peft_model, tokenizer, ids, 20)
    assert got != plain, "the adapter should change the output"
    # the served model's own weights (and live adapter) are untouched
    assert torch.equal(peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, q_before)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tokenizer, engine):
    ids = encode(tokenizer, PROMPTS[1])
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    alone = engine.generate(ids, params).token_ids
    others = [engine.submit(encode(tokenizer, p), SamplingParams(max_new_tokens=12, temperature=0.7, seed=3))
              for p in PROMPTS[2:]]
    crowded = engine.generate(ids, params).token_ids
    for h in others:
        h.result(60)
    assert alone == crowded
    other_seed = engine.generate(ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=8))
    assert other_seed.token_ids != alone
    # top_p that keeps one token is greedy
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=16)).token_ids
    assert engine.generate(ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1)).token_ids == greedy


def test_stop_string_and_streaming(tokenizer, engine):
    ids = encode(tokenizer, PROMPTS[0])
    full = engine.generate(ids, SamplingParams(max_new_tokens=30)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    seen: list[tuple[str, int]] = []
    res = engine.generate(ids, SamplingParams(max_new_tokens=30, stop=[stop]), on_text=lambda t, n: seen.append((t, n)))
    assert res.finish_reason == "stop"
    assert res.text == full[: full.find(stop)]
    assert seen and seen[-1][0] == res.text
    assert all(res.text.startswith(t) for t, _ in seen), "partial texts are prefixes of the answer"


def test_bounds_and_errors(model, tokenizer):
    eng = Engine(model, tokenizer, max_batch=1, max_len=64, max_queue=1)
    try:
        with pytest.raises(UserError, match="exceeds"):
            eng.submit(list(range(10, 60)), SamplingParams(max_new_tokens=20))
        with pytest.raises(UserError, match="empty"):
            eng.submit([], SamplingParams())
        with eng._cv:  # hold the scheduler: the first request waits in the queue, the second finds it full
            first = eng.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
            with pytest.raises(EngineFull, match="queue is full"):
                eng.submit([5, 6, 7], SamplingParams(max_new_tokens=4))
        assert first.result(60).completion_tokens == 4
        # cancel a running request
        started = threading.Event()
        h = eng.submit([5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True),
                       on_text=lambda t, n: started.set())
        h.cancel()
        assert h.result(60).finish_reason in ("cancelled", "length")
    finally:
        eng.close()


def test_generator_uses_the_engine_and_matches_hf(tiny_demo, tokenizer):
    from tinyllama_mcp.pipeline.generate import Generator, generate_ids, load_generator
    from tinyllama_mcp.pipeline.specs import GenerationSpec

    gen = load_generator("tiny-demo")
    try:
        assert isinstance(gen, Generator)
        spec = GenerationSpec(max_new_tokens=24, temperature=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        res = gen.generate(messages=messages, spec=spec)
        assert gen.engine() is not None
        from tinyllama_mcp.pipeline.generate import render_input

        ref_ids = generate_ids(gen.model, gen.tokenizer, render_input(gen.tokenizer, messages, None), spec)
        assert res.text == gen.tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
        assert res.completion_tokens == len(ref_ids)
    finally:
        gen.close()
