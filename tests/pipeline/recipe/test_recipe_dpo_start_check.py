"""DPO fails loudly when its first step does not start at the reference (pipeline/dpo_start_check.py)."""

from __future__ import annotations

import math

import pytest

from tinyllama_mcp.pipeline.recipe import common, dpo_start_check
from tinyllama_mcp.errors import SelfCheckError
from tinyllama_mcp.pipeline.events import read_events
from tinyllama_mcp.pipeline.runner import EXIT_USER, run
from tinyllama_mcp.pipeline.samples import DPO_SAMPLE

from pipeline_testlib import dpo_demo_spec, write_spec


def test_rewards_near_zero_pass_and_far_ones_fail():
    at_reference = {"loss": math.log(2) + 1e-3, "rewards/chosen": 0.02, "rewards/rejected": -0.03}
    dpo_start_check.check_start(at_reference, beta=0.1)
    dpo_start_check.check_start({"loss": 0.7}, beta=0.1)  # no rewards logged: nothing to check
    broken = {"loss": 8.2, "rewards/chosen": -9.3, "rewards/rejected": -1.1}  # as a run on misread NF4 weights logged
    with pytest.raises(SelfCheckError, match=r"does not start at its reference.*-93\.00 \(chosen\).*-11\.00"):
        dpo_start_check.check_start(broken, beta=0.1)


def test_a_policy_that_is_not_its_reference_fails_the_job(tmp_path, monkeypatch):
    """A LoRA initialised away from zero makes the policy differ from its reference at step 1: the job ends with
    the check's error (exit 2, no retry), no `end` event and no adapter."""
    lora_config = common.lora_config

    def random_lora(spec):
        config = lora_config(spec)
        config.init_lora_weights = False  # B random: the adapter changes the model before any step
        return config

    monkeypatch.setattr(common, "lora_config", random_lora)
    spec = dpo_demo_spec(DPO_SAMPLE, sft_adapter=None, training={"max_steps": 2},
                         eval_prompts={"prompts": [], "max_new_tokens": 1})
    job_dir = write_spec(tmp_path / "dpo", spec)
    assert run(job_dir) == EXIT_USER
    events = read_events(job_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "error" and "end" not in kinds and kinds.count("step") == 1
    assert events[-1]["message"].startswith("DPO's first step does not start at its reference")
    assert not (job_dir / "adapter").exists()
