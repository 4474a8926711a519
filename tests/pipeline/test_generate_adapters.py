"""Serving adapters: several of one base share one Generator (and batch); an adapter that would answer as the
base, because its weights are zero or its module names miss the model's, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.modeling import load_tokenizer, write_stack
from tinyllama_mcp.pipeline.specs import GenerationSpec, QuantSpec
from tinyllama_mcp.server.generation import GeneratorCache

QUESTION = [{"role": "user", "content": "What is a unit test?"}]
GREEDY = GenerationSpec(max_new_tokens=12, temperature=0.0)


def save_adapter(tiny_demo: str, folder: Path, seed: int, targets: list[str], scale: float = 0.3) -> str:
    """A LoRA adapter on tiny-demo, as a job leaves it (PEFT files + stack.json); B random unless scale is 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale) if scale else param.zero_()
    model.save_pretrained(folder)
    load_tokenizer(tiny_demo).save_pretrained(folder)
    write_stack(folder, "tiny-demo", QuantSpec(quantization="none"), parents=[])
    return str(folder)


def test_adapters_of_one_base_share_a_generator_and_keep_their_own_outputs(tiny_demo, tmp_path):
    from tinyllama_mcp.pipeline.generate import load_generator

    one = save_adapter(tiny_demo, tmp_path / "one", 1, ["q_proj", "v_proj"])
    two = save_adapter(tiny_demo, tmp_path / "two", 2, ["gate_proj", "down_proj"])
    alone = {ref: load_generator(ref).generate(messages=QUESTION, spec=GREEDY).token_ids for ref in (one, two)}
    cache = GeneratorCache(max_loaded=1)
    got = {ref: cache.generate_sync(ref, QUESTION, None, GREEDY).token_ids for ref in (one, two, "tiny-demo")}
    assert got[one] == alone[one] and got[two] == alone[two]
    assert len({tuple(v) for v in got.values()}) == 3
    generator_one, name_one = cache._get(one)
    generator_two, name_two = cache._get(two)
    assert generator_one is generator_two and name_one != name_two  # one base, both adapters on it


def test_an_adapter_with_zero_weights_is_refused(tiny_demo, tmp_path):
    zero = save_adapter(tiny_demo, tmp_path / "zero", 3, ["q_proj"], scale=0.0)
    with pytest.raises(UserError, match="does not change the model's output"):
        GeneratorCache().generate_sync(zero, QUESTION, None, GREEDY)


def test_an_adapter_whose_module_names_do_not_match_is_refused(tiny_demo, tmp_path):
    """Keys renamed as another architecture would name them: PEFT loads nothing into the model's LoRA layers."""
    from safetensors.torch import load_file, save_file

    folder = Path(save_adapter(tiny_demo, tmp_path / "renamed", 4, ["q_proj", "v_proj"]))
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({key.replace("self_attn", "attention"): value for key, value in weights.items()},
              folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="module names do not match"):
        GeneratorCache().generate_sync(str(folder), QUESTION, None, GREEDY)


def test_transformers_path_serves_each_adapter_and_the_base(tiny_demo, tmp_path, monkeypatch):
    """Without the engine, one model holds the adapters and each call sets its own (one call at a time)."""
    one = save_adapter(tiny_demo, tmp_path / "one", 1, ["q_proj", "v_proj"])
    two = save_adapter(tiny_demo, tmp_path / "two", 2, ["gate_proj", "down_proj"])
    with_engine = {ref: GeneratorCache().generate_sync(ref, QUESTION, None, GREEDY).token_ids
                   for ref in (one, two, "tiny-demo")}
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE", "0")
    cache = GeneratorCache()
    for ref in (one, two, "tiny-demo", one):
        assert cache.generate_sync(ref, QUESTION, None, GREEDY).token_ids == with_engine[ref], ref
    assert cache._get(one)[0] is cache._get(two)[0] and cache._get(one)[0].engine() is None
