"""Seeded sampling: a hash of (seed, position, token), so the same text whatever else is in the batch."""

from __future__ import annotations

from engine_testlib import PROMPTS, encode
from tinyllama_mcp.pipeline.engine import SamplingParams


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
