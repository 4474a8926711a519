"""Synthetic data and a TinyLlama-1.1B-shaped random model for GPU runs (nothing can be downloaded there).

Rows have a realistic length spread: chat turns from ~100 to 2,000+ tokens, log-uniformly drawn,
so padding and batching behave as they would on real chat data.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

TINYLLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def _words() -> list[str]:
    words = set()
    for line in SFT_SAMPLE.read_text().splitlines():
        for m in json.loads(line)["messages"]:
            words.update(m["content"].split())
    return sorted(words)


def _text(rng: random.Random, words: list[str], n_words: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n_words))


def _length(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sft_rows(n: int, seed: int = 0, lo: int = 100, hi: int = 2200) -> list[dict]:
    """Chat rows whose total length is log-uniform in [lo, hi] words (~tokens with the tiny tokenizer x2)."""
    rng, words = random.Random(seed), _words()
    rows = []
    for _ in range(n):
        total = _length(rng, lo, hi)
        prompt = max(total // 4, 5)
        rows.append({"messages": [
            {"role": "user", "content": _text(rng, words, prompt)},
            {"role": "assistant", "content": _text(rng, words, total - prompt)},
        ]})
    return rows


def dpo_rows(n: int, seed: int = 0, lo: int = 50, hi: int = 600) -> list[dict]:
    rng, words = random.Random(seed), _words()
    return [
        {"system": "", "input": _text(rng, words, _length(rng, lo, hi)),
         "chosen": _text(rng, words, _length(rng, lo, hi)), "rejected": _text(rng, words, _length(rng, lo, hi))}
        for _ in range(n)
    ]


def chat_rows(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """Multi-turn chat rows shaped like UltraChat's: 1-6 exchanges (mean ~3), ~1,100 tokens a row, most past 512."""
    rng, words = random.Random(seed), _words()
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice([1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 6])):
            messages.append({"role": "user", "content": _text(rng, words, max(int(_length(rng, 10, 120) * scale), 3))})
            messages.append({"role": "assistant",
                             "content": _text(rng, words, max(int(_length(rng, 60, 360) * scale), 3))})
        rows.append({"messages": messages})
    return rows


ORCA_SYSTEMS = ["", "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
                "You are a helpful assistant, who always provide explanation. Think like you are answering to a five "
                "year old.",
                "You are an AI assistant that follows instruction extremely well. Help as much as you can."]


def orca_pairs(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """Preference pairs shaped like distilabel's Orca pairs: a system prompt or none, a task, two answers."""
    rng, words = random.Random(seed), _words()

    def text(lo: int, hi: int) -> str:
        return _text(rng, words, max(int(_length(rng, lo, hi) * scale), 3))

    return [{"system": rng.choice(ORCA_SYSTEMS), "input": text(20, 300), "chosen": text(30, 300),
             "rejected": text(20, 250)} for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tinyllama_shaped(folder: Path, dtype_name: str = "bf16") -> Path:
    """A TinyLlama-1.1B-shaped Llama with random weights and tiny-demo's tokenizer (ids < 1024 used)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(ensure_tiny_demo())
    config = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **TINYLLAMA_SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
