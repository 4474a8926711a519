"""The whole retrain loop through MCP: start_sft -> start_dpo -> merge -> generate, with real training.

One worker runs the jobs in subprocesses (`python -m tinyllama_mcp.pipeline run`); DPO and merge are queued at
once and wait for their parents. While they train, generate loads tiny-demo in this process and
status keeps answering quickly. Then generate answers from the merged model, by default, and from
an unmerged SFT adapter.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.server.support import TINY_DPO, TINY_SFT, error_text, serving, wait_state

pytestmark = pytest.mark.slow


async def test_sft_dpo_merge_generate_through_mcp(make_settings):
    async with serving(make_settings(), run_worker=True) as (client, _):
        sft = await client.call_tool("start_sft", {**TINY_SFT, "save_steps": 2})
        assert not sft.is_error, error_text(sft)
        sft_id = sft.structured_content["job_id"]
        dpo_id = (await client.call_tool("start_dpo", {**TINY_DPO, "sft_job_id": sft_id})).structured_content["job_id"]
        merge = await client.call_tool("merge", {"dpo_job_id": dpo_id, "output_name": "flow-merged"})
        merge_id = merge.structured_content["job_id"]

        # generate's first call loads the model in a worker thread: status keeps answering meanwhile
        status_answers = 0
        first: dict = {}

        async def generate_from_tiny_demo() -> None:
            first["out"] = await client.call_tool(
                "generate", {"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Which log level should a retry use?"}],
                             "model": "tiny-demo", "max_new_tokens": 12, "temperature": 0.7, "seed": 3})

        async with anyio.create_task_group() as group:
            group.start_soon(generate_from_tiny_demo)
            while "out" not in first:
                assert not (await client.call_tool("status", {})).is_error
                status_answers += 1
                await anyio.sleep(0.05)
        assert not first["out"].is_error, error_text(first["out"])
        assert first["out"].structured_content["model"] == "tiny-demo"
        # status answered while generate was still working (no time bound: CI machines vary)
        assert status_answers, "status never answered while generate was running"

        merged = await wait_state(client, merge_id, timeout_s=240)
        assert merged["state"] == "succeeded", merged
        sft_view = (await client.call_tool("status", {"job_id": sft_id})).structured_content["job"]
        dpo_view = (await client.call_tool("status", {"job_id": dpo_id})).structured_content["job"]

        # SFT: trained for the 4 steps asked, with metrics, artifacts and a log
        assert sft_view["state"] == "succeeded" and sft_view["attempts"] == 1
        assert sft_view["progress"] == {"step": 4, "total": 4, "percent": 100.0, "epoch": sft_view["progress"]["epoch"]}
        assert sft_view["metrics"]["loss"] > 0 and sft_view["summary"]["steps"] == 4
        assert (Path(sft_view["artifacts"]["adapter"]) / "adapter_config.json").is_file()
        assert sft_view["log_tail"] and sft_view["error"] is None
        # DPO waited for its parent, and reports preference metrics
        assert dpo_view["started_at"] >= sft_view["finished_at"]
        assert dpo_view["metrics"]["reward_accuracy"] is not None and "reward_accuracy" in dpo_view["summary"]
        # merge: a standalone checkpoint that plain transformers loads
        merged_dir = Path(merged["artifacts"]["merged"])
        assert (merged_dir / "config.json").is_file() and merged["output_name"] == "flow-merged"
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(merged_dir).config.model_type == "llama"

        answer = await client.call_tool(
            "generate", {"prompt": "How do I name a feature branch?", "model": "flow-merged",
                         "max_new_tokens": 8, "temperature": 0})
        assert not answer.is_error, error_text(answer)
        out = answer.structured_content
        assert isinstance(out["text"], str) and merge_id in out["model"]
        assert out["usage"]["prompt_tokens"] > 5 and 1 <= out["usage"]["completion_tokens"] <= 8
        assert out["latency_ms"] > 0 and out["finish_reason"] in ("stop", "length")

        default = (await client.call_tool("generate", {"prompt": "hello", "max_new_tokens": 4})).structured_content
        assert merge_id in default["model"] and "newest merged model" in default["model"]

        raw = (await client.call_tool("generate", {"prompt": "Run the", "raw": True, "model": sft_id,
                                                   "max_new_tokens": 4})).structured_content
        assert sft_id in raw["model"] and raw["usage"]["prompt_tokens"] < out["usage"]["prompt_tokens"]
