"""The engine's scheduling on CPU: continuous batching gives transformers' greedy tokens; stops, streaming, bounds."""

from __future__ import annotations

import threading

import pytest

from engine_testlib import PROMPTS, encode, hf_greedy
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, EngineFull, SamplingParams


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
    eng = Engine(model, tokenizer, EngineConfig(max_batch=1, max_len=64, max_queue=1))
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
