"""Step-by-step decoding: log-probabilities as transformers computes them, prompt scoring, token masks, and
the same tokens as the chunked path whatever shares the batch."""

from __future__ import annotations

import pytest
import torch

from engine_testlib import PROMPTS, encode, hf_greedy
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.engine import SamplingParams


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `ids` [T, V]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


class OnlyTokens:
    """A constraint of the engine's protocol: only `allowed_ids` may come next, done after `length` tokens."""

    def __init__(self, allowed_ids: list[int], vocab: int, length: int):
        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[allowed_ids] = True
        self.length, self.seen = length, []

    def allowed(self) -> torch.Tensor:
        return self.mask

    def advance(self, token_id: int) -> None:
        assert self.mask[token_id], f"token {token_id} was not allowed"
        self.seen.append(token_id)

    @property
    def done(self) -> bool:
        return len(self.seen) >= self.length


def test_generated_logprobs_match_transformers(model, tokenizer, engine):
    ids = encode(tokenizer, PROMPTS[0])
    result = engine.generate(ids, SamplingParams(max_new_tokens=6, logprobs=3, ignore_eos=True))
    assert result.token_ids == hf_greedy(model, tokenizer, ids, 6)[: len(result.token_ids)]
    reference = hf_logprobs(model, ids + result.token_ids)
    assert len(result.logprobs) == len(result.token_ids)
    for j, record in enumerate(result.logprobs):
        row = reference[len(ids) - 1 + j]
        assert record.token_id == result.token_ids[j]
        assert record.logprob == pytest.approx(row[record.token_id].item(), abs=1e-4)
        assert [t for t, _ in record.top] == row.topk(3).indices.tolist()
        assert record.top[0][0] == record.token_id  # greedy: the chosen token is the most likely one


def test_prompt_scoring_with_no_new_tokens(model, tokenizer, engine):
    ids = encode(tokenizer, PROMPTS[2])
    result = engine.generate(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    assert result.token_ids == [] and result.finish_reason == "length"
    assert result.prompt_token_ids == ids
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(ids)
    reference = hf_logprobs(model, ids)
    for i in range(1, len(ids)):
        record = result.prompt_logprobs[i]
        assert record.token_id == ids[i]
        assert record.logprob == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
        assert len(record.top) == 2


def test_a_mask_is_followed_from_the_first_token(tokenizer, engine):
    ids = encode(tokenizer, PROMPTS[1])
    allowed = encode(tokenizer, " yes no maybe")
    vocab = engine.runner.vocab
    for seed, temperature in ((None, 0.0), (7, 1.0)):
        constraint = OnlyTokens(allowed, vocab, length=5)
        result = engine.generate(ids, SamplingParams(max_new_tokens=20, temperature=temperature, seed=seed,
                                                     constraint=constraint))
        assert result.finish_reason == "stop" and result.token_ids == constraint.seen
        assert len(result.token_ids) == 5 and set(result.token_ids) <= set(allowed)


def test_exact_and_chunked_rows_share_a_batch_without_changing_each_other(model, tokenizer, engine):
    """A plain request decoded beside a step-by-step one gives its chunked-path tokens, and the other way round."""
    a, b = encode(tokenizer, PROMPTS[0]), encode(tokenizer, PROMPTS[3])
    alone_a = engine.generate(a, SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids
    alone_b = engine.generate(b, SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True)).token_ids
    handles = [engine.submit(a, SamplingParams(max_new_tokens=12, logprobs=0, ignore_eos=True)),
               engine.submit(b, SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True))]
    together = [h.result(timeout=60) for h in handles]
    assert together[0].token_ids == alone_a and together[1].token_ids == alone_b
    assert together[0].logprobs is not None and together[1].logprobs is None


def test_zero_new_tokens_needs_prompt_scoring(tokenizer, engine):
    with pytest.raises(UserError, match="max_new_tokens"):
        engine.submit(encode(tokenizer, "Hi"), SamplingParams(max_new_tokens=0))
