"""start_sft / start_dpo with validation data: validation_dataset is checked like dataset and pinned by its sha256,
eval_fraction reaches the spec, and wrong combinations are clear errors (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE

from tests.server.support import TINY_DPO, TINY_SFT, error_text, serving


async def test_validation_arguments_reach_the_spec(make_settings):
    async with serving(make_settings()) as (client, _):
        sft = await client.call_tool("start_sft", {**TINY_SFT, "validation_dataset": str(SFT_SAMPLE)})
        dpo = await client.call_tool("start_dpo", {**TINY_DPO, "base_model": "tiny-demo", "eval_fraction": 0.25})
    assert not sft.is_error and not dpo.is_error, (error_text(sft) if sft.is_error else error_text(dpo))
    sft_spec = json.loads((Path(sft.structured_content["job_dir"]) / "spec.json").read_text())
    assert sft_spec["validation_dataset"]["source"] == str(SFT_SAMPLE)
    assert sft_spec["validation_dataset"]["sha256"] == sft.structured_content["validation_preflight"]["sha256"]
    dpo_spec = json.loads((Path(dpo.structured_content["job_dir"]) / "spec.json").read_text())
    assert dpo_spec["training"]["eval_fraction"] == 0.25 and dpo_spec["validation_dataset"] is None
    assert dpo.structured_content["validation_preflight"] is None


async def test_wrong_validation_arguments_are_clear_errors(make_settings, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(SFT_SAMPLE.read_text())
    async with serving(make_settings()) as (client, _):
        both = await client.call_tool("start_sft", {**TINY_SFT, "validation_dataset": str(SFT_SAMPLE),
                                                    "eval_fraction": 0.1})
        split_alone = await client.call_tool("start_sft", {**TINY_SFT, "validation_split": "test"})
        few_rows = await client.call_tool("start_sft", {**TINY_SFT, "max_samples": 3, "eval_fraction": 0.25})
        not_allowed = await client.call_tool("start_sft", {**TINY_SFT, "validation_dataset": str(outside)})
        wrong_kind = await client.call_tool("start_sft", {**TINY_SFT, "validation_dataset": str(DPO_SAMPLE)})
    assert "give validation_dataset or eval_fraction, not both" in error_text(both)
    assert "give validation_dataset too" in error_text(split_alone)
    assert "eval_fraction needs at least 4 rows" in error_text(few_rows) and "has 3" in error_text(few_rows)
    assert "outside the allowed folders" in error_text(not_allowed)
    assert str(DPO_SAMPLE) in error_text(wrong_kind) and "missing column 'messages'" in error_text(wrong_kind)
