"""What the engine tests share: prompts, and transformers' greedy output to compare the engine with."""

from __future__ import annotations

import torch

PROMPTS = [
    "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n",
    "Hello",
    "Explain in one sentence what a unit test is, and why teams write them before refactoring code.",
    "<|system|>\nBe brief.</s>\n<|user|>\nName a branch.</s>\n<|assistant|>\n",
]


def hf_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids):].tolist()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]
