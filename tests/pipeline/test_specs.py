"""Stage specs: the reference recipe as defaults, and bad values refused with the field named."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tinyllama_mcp.pipeline.samples import DEMO_DPO_OVERRIDES, DEMO_SFT_OVERRIDES
from tinyllama_mcp.pipeline.specs import (
    LLAMA_PROJECTIONS,
    DPOSpec,
    GenerationSpec,
    MergeSpec,
    SFTSpec,
    parse_stage_spec,
)

from pipeline_testlib import demo_sections


def error_locations(exc: ValidationError) -> list[str]:
    return [".".join(str(part) for part in error["loc"]) for error in exc.errors()]


def test_sft_defaults_are_the_reference_recipe():
    spec = SFTSpec()
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.bias) == (64, 32, 0.1, "none")
    assert spec.lora.target_modules == list(LLAMA_PROJECTIONS)
    assert (spec.quant.quantization, spec.quant.double_quant) == ("nf4", True)
    t = spec.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2, 4)
    assert (t.optim, t.learning_rate, t.lr_scheduler_type, t.num_train_epochs) == ("paged_adamw_32bit", 2e-4, "cosine", 1.0)
    assert t.max_length == 512
    assert spec.base_model == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    assert (spec.dataset.source, spec.dataset.split) == ("HuggingFaceH4/ultrachat_200k", "test_sft")
    assert (spec.dataset.shuffle_seed, spec.dataset.max_samples) == (42, 3000)


def test_dpo_defaults_are_the_reference_recipe():
    spec = DPOSpec()
    t = spec.training
    assert (t.learning_rate, t.lr_scheduler_type, t.max_steps, t.warmup_ratio, t.max_length) == (1e-5, "cosine", 200, 0.1, 512)
    assert spec.beta == 0.1
    assert spec.lora == SFTSpec().lora
    assert spec.dataset.source == "argilla/distilabel-intel-orca-dpo-pairs"


def test_generation_defaults():
    spec = GenerationSpec()
    assert (spec.max_new_tokens, spec.temperature, spec.sampling) == (512, 0.2, True)
    assert GenerationSpec(temperature=0).sampling is False


@pytest.mark.parametrize(
    "data, field",
    [
        ({"stage": "sft", "lora": {"r": 0}}, "sft.lora.r"),
        ({"stage": "sft", "lora": {"target_modules": ["q_proj", "attn_out"]}}, "sft.lora.target_modules"),
        ({"stage": "sft", "lora": {"target_modules": ["q_proj", "q_proj"]}}, "sft.lora.target_modules"),
        ({"stage": "sft", "lora": {"target_modules": []}}, "sft.lora.target_modules"),
        ({"stage": "sft", "lora": {"dropout": 1.0}}, "sft.lora.dropout"),
        ({"stage": "sft", "training": {"learning_rate": 0}}, "sft.training.learning_rate"),
        ({"stage": "sft", "training": {"learning_rate": -1e-4}}, "sft.training.learning_rate"),
        ({"stage": "sft", "training": {"max_length": 8}}, "sft.training.max_length"),
        ({"stage": "sft", "training": {"optim": "sgd"}}, "sft.training.optim"),
        ({"stage": "sft", "training": {"learning_rte": 1e-4}}, "sft.training.learning_rte"),
        ({"stage": "sft", "epochs": 3}, "sft.epochs"),
        ({"stage": "sft", "quant": {"quantization": "int8"}}, "sft.quant.quantization"),
        ({"stage": "sft", "dataset": {"source": ""}}, "sft.dataset.source"),
        ({"stage": "sft", "dataset": {"source": "a.jsonl", "sha256": "abc"}}, "sft.dataset.sha256"),
        ({"stage": "dpo", "beta": 0}, "dpo.beta"),
        ({"stage": "merge"}, "merge.sft_adapter"),
        ({"stage": "merge", "sft_adapter": "x", "dtype": "int4"}, "merge.dtype"),
        ({"stage": "rlhf"}, ""),
    ],
)
def test_bad_spec_values_name_the_field(data, field):
    with pytest.raises(ValidationError) as info:
        parse_stage_spec(json.dumps(data))
    locations = error_locations(info.value)
    if field:
        assert field in locations, locations
    else:  # an unknown stage: the discriminator is what is wrong
        assert "rlhf" in str(info.value) and "stage" in str(info.value)


def test_unknown_target_module_message_lists_the_choices():
    with pytest.raises(ValidationError) as info:
        SFTSpec(lora={"target_modules": ["qkv_proj"]})
    assert "qkv_proj" in str(info.value) and "q_proj" in str(info.value)


def test_assignment_is_validated_too():
    spec = SFTSpec()
    with pytest.raises(ValidationError) as info:
        spec.training.learning_rate = 0.0
    assert "learning_rate" in error_locations(info.value)


def test_sampling_needs_a_temperature():
    with pytest.raises(ValidationError, match="temperature"):
        GenerationSpec(do_sample=True, temperature=0)


@pytest.mark.parametrize(
    "spec",
    [
        SFTSpec(base_model="tiny-demo", dataset={"source": "/data/sft.jsonl", "max_samples": 10}),
        DPOSpec(sft_adapter="/jobs/1/adapter", beta=0.2),
        MergeSpec(sft_adapter="/jobs/1/adapter", dpo_adapter="/jobs/2/adapter", dtype="fp16"),
    ],
)
def test_spec_json_round_trip(spec):
    again = parse_stage_spec(spec.model_dump_json())
    assert type(again) is type(spec) and again == spec


@pytest.mark.parametrize("overrides, spec_type", [(DEMO_SFT_OVERRIDES, SFTSpec), (DEMO_DPO_OVERRIDES, DPOSpec)])
def test_demo_overrides_are_valid_spec_fields(overrides, spec_type):
    """The flat demo arguments map onto the spec's sections (lora_* -> lora, the rest -> training)."""
    sections = demo_sections(overrides)
    spec = spec_type(**sections)
    assert spec.lora.r == overrides["lora_r"] and spec.lora.alpha == overrides["lora_alpha"]
    assert spec.training.learning_rate == overrides["learning_rate"]
    assert set(sections["training"]) <= set(spec.training.model_fields_set)
