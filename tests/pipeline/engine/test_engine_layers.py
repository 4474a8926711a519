"""The decode layer variants, run eagerly on CPU: same greedy tokens as transformers."""

from __future__ import annotations

from engine_testlib import PROMPTS, encode, hf_greedy
from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, SamplingParams


def test_reduce_attention_decode_layer_matches_hf(model, tokenizer):
    """The decode layer the GPU compiles (attention as fp32 multiply-and-sum), run eagerly: same greedy tokens."""
    eng = Engine(model, tokenizer, EngineConfig(max_batch=2, max_len=128, chunk=3, attention="reduce"))
    try:
        assert eng.info.compile_mode == "none" and eng.info.attention == "reduce"
        ids = [encode(tokenizer, p) for p in PROMPTS[:2]]
        handles = [eng.submit(i, SamplingParams(max_new_tokens=n)) for i, n in zip(ids, (18, 11))]
        for i, n, h in zip(ids, (18, 11), handles):
            assert h.result(120).token_ids == hf_greedy(model, tokenizer, i, n)
    finally:
        eng.close()
