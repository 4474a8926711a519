"""Sampling settings and the next-token choice, on the GPU and without RNG state.

The noise for token v at position p of a request seeded s is a hash of (s, p, v), turned into an
exponential race (Gumbel-max), so a seeded request gives the same text whatever else is in the batch,
and CUDA graphs need no RNG handling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # record each generated token's log-probability and its top `logprobs`
    prompt_logprobs: Optional[int] = None  # score the prompt: each token's log-probability and its top k
    constraint: Optional[Any] = None  # a pipeline.constraint.GrammarConstraint the output must follow
    adapter: Optional[str] = None  # a LoRA adapter added to the engine (Engine.add_adapter); None: the base

    @property
    def exact(self) -> bool:
        """Decoded one step at a time, the host in the loop: a grammar or log-probabilities need it."""
        return self.logprobs is not None or self.constraint is not None

    @classmethod
    def from_spec(cls, spec) -> "SamplingParams":
        """From a pipeline.specs.GenerationSpec."""
        return cls(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature if spec.sampling else 0.0,
            top_p=spec.top_p if spec.sampling else 1.0,
            seed=spec.seed,
            stop=tuple(spec.stop),
            logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs,
        )


def hash_uniform(seed: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise as a pure hash of (seed, position, token id): int64 ops, no overflow."""
    x = (seed * 0x27D4EB2D + pos * 0x165667B1).unsqueeze(-1) + idx * 0x61C88647
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    x = x ^ (x >> 16)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def pick_tokens(logits: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                pos: torch.Tensor, sampling: bool) -> torch.Tensor:
    """Next token per row: argmax where temp == 0, else a top-p sample keyed by (seed, pos). logits fp32 [b, V].

    sampling=False skips the sampling work when no row samples (a separate graph per mode)."""
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy
    probs = torch.softmax(logits / temp.clamp_min(1e-5).unsqueeze(-1), dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p.unsqueeze(-1)  # the most likely token is always kept
    sp = sp.masked_fill(~keep, 0.0)
    race = sp / -torch.log(hash_uniform(seed, pos, si))  # exponential race == sampling proportional to sp
    sampled = si.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temp > 0, sampled, greedy)
