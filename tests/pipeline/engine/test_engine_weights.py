"""The engine's private copy of the weights: a live LoRA adapter merged in, the served model untouched."""

from __future__ import annotations

import torch

from engine_testlib import PROMPTS, encode, hf_greedy
from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, SamplingParams


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
    with Engine(peft_model, tokenizer, EngineConfig(max_batch=2, max_len=128)) as eng:
        got = eng.generate(ids, SamplingParams(max_new_tokens=20)).token_ids
        assert eng.info.lora_merged_privately
    assert got == hf_greedy(peft_model, tokenizer, ids, 20)
    with peft_model.disable_adapter():
        plain = hf_greedy(peft_model, tokenizer, ids, 20)
    assert got != plain, "the adapter should change the output"
    # the served model's own weights (and live adapter) are untouched
    assert torch.equal(peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, q_before)
