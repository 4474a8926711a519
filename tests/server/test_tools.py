"""Every tool through the SDK's in-memory client: schemas, happy paths that queue, and every kind of bad input.

The worker is off here, so jobs stay queued; training runs in test_flow.py and test_recovery.py.
"""

from __future__ import annotations

import json

import anyio
import pytest

from tinyllama_mcp.pipeline.specs import parse_stage_spec
from tests.server.support import TINY_DPO, TINY_SFT, error_text, serving, store_of

async def test_tools_list_publishes_schemas_annotations_and_descriptions(make_settings):
    async with serving(make_settings()) as (client, _):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert list(tools) == ["start_sft", "start_dpo", "merge", "status", "generate", "cancel", "promote", "rollback", "aliases", "wait",
                          "export", "evaluate", "compare", "compare_results", "judge"]
    for tool in tools.values():
        assert tool.input_schema["type"] == "object"
        assert tool.input_schema.get("additionalProperties") is False, tool.name
        assert tool.output_schema and tool.output_schema["type"] == "object", tool.name
        assert len(tool.description) > 80, tool.name
        for name, prop in tool.input_schema["properties"].items():
            assert prop.get("description") or name == "role", f"{tool.name}.{name} has no description"
    assert tools["status"].annotations.read_only_hint and tools["generate"].annotations.read_only_hint
    assert tools["cancel"].annotations.destructive_hint and not tools["cancel"].annotations.read_only_hint
    assert not tools["start_sft"].annotations.read_only_hint
    sft_props = tools["start_sft"].input_schema["properties"]
    for field in ("dataset", "base_model", "output_name", "max_steps", "num_train_epochs", "learning_rate", "lora_r",
                  "lora_alpha", "lora_dropout", "target_modules", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_length", "quantization", "seed", "max_samples"):
        assert field in sft_props, field
    assert {"sft_job_id", "beta", "dataset"} <= set(tools["start_dpo"].input_schema["properties"])
    assert set(tools["generate"].output_schema["properties"]) >= {"text", "model", "usage", "latency_ms"}


async def test_start_sft_preflights_and_queues(make_settings, home):
    async with serving(make_settings()) as (client, _):
        result = await client.call_tool("start_sft", {**TINY_SFT, "output_name": "my-sft"})
        assert not result.is_error, error_text(result)
        out = result.structured_content
        assert out["state"] == "queued" and out["queue_position"] == 1 and out["stage"] == "sft"
        assert out["preflight"]["rows"] == 8 and len(out["preflight"]["sha256"]) == 64
        assert out["preflight"]["token_stats"]["max"] > 0
        assert "wait(job_id='" in out["next_step"] and "start_dpo" in out["next_step"]
        spec = parse_stage_spec((home / "jobs" / out["job_id"] / "spec.json").read_text())
        assert spec.base_model == "tiny-demo" and spec.training.max_steps == 4 and spec.lora.r == 8
        assert spec.dataset.sha256 == out["preflight"]["sha256"]  # the checked file is pinned
        assert spec.quant.quantization == "none"

        listed = (await client.call_tool("status", {})).structured_content
        assert listed["queue"] == [out["job_id"]] and listed["jobs"][0]["output_name"] == "my-sft"
        assert "No worker is alive" in listed["hint"]


async def test_dpo_can_chain_on_a_queued_sft_job_and_merge_finds_the_sft_job(make_settings, home):
    async with serving(make_settings()) as (client, _):
        sft = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
        dpo = (await client.call_tool("start_dpo", {**TINY_DPO, "sft_job_id": sft, "beta": 0.2})).structured_content
        assert dpo["waiting_for"] == [sft] and dpo["queue_position"] is None and dpo["parents"] == [sft]
        spec = parse_stage_spec((home / "jobs" / dpo["job_id"] / "spec.json").read_text())
        assert spec.sft_adapter == str(home / "jobs" / sft / "adapter") and spec.beta == 0.2
        assert spec.base_model == "tiny-demo"  # always the SFT job's base

        merged = await client.call_tool("merge", {"dpo_job_id": dpo["job_id"], "output_name": "final", "dtype": "fp32"})
        out = merged.structured_content
        assert out["parents"] == [sft, dpo["job_id"]] and out["output_name"] == "final"
        spec = parse_stage_spec((home / "jobs" / out["job_id"] / "spec.json").read_text())
        assert spec.dpo_adapter == str(home / "jobs" / dpo["job_id"] / "adapter") and spec.dtype == "fp32"
        assert "generate(model='final'" in out["next_step"]


async def test_target_modules_sent_as_json_text_are_accepted(make_settings, home):
    async with serving(make_settings()) as (client, _):
        result = await client.call_tool("start_sft", {**TINY_SFT, "target_modules": '["q_proj", "v_proj"]'})
        assert not result.is_error, error_text(result)
        spec = parse_stage_spec((home / "jobs" / result.structured_content["job_id"] / "spec.json").read_text())
        assert spec.lora.target_modules == ["q_proj", "v_proj"]


async def test_cancel_a_queued_job_and_read_it_as_a_resource(make_settings):
    async with serving(make_settings()) as (client, _):
        job_id = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
        out = (await client.call_tool("cancel", {"job_id": job_id})).structured_content
        assert (out["previous_state"], out["state"]) == ("queued", "cancelled")
        again = (await client.call_tool("cancel", {"job_id": job_id})).structured_content
        assert again["state"] == "cancelled" and "already cancelled" in again["message"]
        resource = await client.read_resource(f"jobs://{job_id}")
        assert json.loads(resource.contents[0].text)["state"] == "cancelled"
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["jobs://{job_id}", "models://{ref}"]
        prompt = await client.get_prompt("retrain_workflow", {"sft_dataset": "data/chat.jsonl"})
        text = prompt.messages[0].content.text
        assert "start_sft(dataset='data/chat.jsonl'" in text and "merge(" in text and "generate(" in text


async def _finished_jobs(client, home) -> dict:
    """Two SFT jobs moved to final states through the store, as a worker would (no training needed)."""
    a = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
    b = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
    dpo = (await client.call_tool("start_dpo", {**TINY_DPO, "sft_job_id": b})).structured_content["job_id"]
    store = store_of(home)
    store.acquire_lease(0, "test-worker", 1, "h", ttl_s=60)
    assert store.claim(0, "test-worker", "h").id == a
    store.finish(a, "test-worker", "succeeded")
    assert store.claim(0, "test-worker", "h").id == b
    store.finish(b, "test-worker", "cancelled", "cancelled while running")
    store.release_lease(0, "test-worker")
    store.close()
    return {"succeeded": a, "cancelled": b, "dpo_of_cancelled": dpo}


# (tool, arguments, words the error must contain)
BAD_INPUTS = [
    ("start_sft", {**TINY_SFT, "learning_rate": -1}, "learning_rate: Input should be greater than 0"),
    ("start_sft", {**TINY_SFT, "lora_r": "big"}, "lora_r: Input should be a valid integer"),
    ("start_sft", {**TINY_SFT, "learnin_rate": 0.1}, "learnin_rate: unknown argument"),
    ("start_sft", {**TINY_SFT, "quantization": "int8"}, "quantization: Input should be 'nf4' or 'none'"),
    ("start_sft", {**TINY_SFT, "target_modules": ["q_proj", "lm_head"]}, "target_modules.1: Input should be"),
    ("start_sft", {**TINY_SFT, "max_length": 8}, "max_length: Input should be greater than or equal to 16"),
    ("start_sft", {**TINY_SFT, "output_name": "no spaces!"}, "output_name: String should match pattern"),
    ("start_sft", {**TINY_SFT, "dataset": "x" * 5000}, "dataset: String should have at most 4096 characters"),
    ("start_sft", {**TINY_SFT, "dataset": "../../etc/passwd"}, "contains '..'"),
    ("start_sft", {**TINY_SFT, "dataset": "/etc/passwd"}, "is outside the allowed folders"),
    ("start_sft", {**TINY_SFT, "dataset": "HuggingFaceH4/ultrachat_200k"}, "offline"),
    ("start_sft", {**TINY_SFT, "base_model": "/etc"}, "is outside the allowed folders"),
    ("start_sft", {**TINY_SFT, "base_model": "sft-000000000000"}, "no job 'sft-000000000000'"),
    ("start_sft", {**TINY_SFT, "base_model": "{succeeded}"}, "is a sft job; train on top of it with start_dpo"),
    ("start_dpo", {**TINY_DPO, "sft_job_id": "sft-123"}, "sft_job_id: String should match pattern"),
    ("start_dpo", {**TINY_DPO, "sft_job_id": "sft-000000000000"}, "no job 'sft-000000000000'"),
    ("start_dpo", {**TINY_DPO, "sft_job_id": "{dpo_of_cancelled}"}, "is a dpo job, not a sft job"),
    ("start_dpo", {**TINY_DPO, "sft_job_id": "{cancelled}"}, "cancelled; start that stage again"),
    ("start_dpo", {**TINY_DPO, "beta": 0}, "beta: Input should be greater than 0"),
    ("start_dpo", {**TINY_DPO, "sft_job_id": "{succeeded}", "base_model": "gpt2"}, "differs from the base of SFT job"),
    ("start_dpo", {**TINY_DPO, "dataset": "{sft_sample}", "base_model": "tiny-demo"}, "chosen"),
    ("merge", {}, "give sft_job_id, dpo_job_id or both"),
    ("merge", {"sft_job_id": "{succeeded}", "dtype": "int4"}, "dtype: Input should be"),
    ("merge", {"sft_job_id": "{cancelled}"}, "cancelled; start that stage again"),
    ("merge", {"sft_job_id": "{succeeded}", "dpo_job_id": "{dpo_of_cancelled}"}, "was trained on SFT job"),
    ("status", {"job_id": "../../etc/passwd"}, "job_id: String should match pattern"),
    ("status", {"job_id": "merge-000000000000"}, "no job 'merge-000000000000'"),
    ("status", {"limit": 0}, "limit: Input should be greater than or equal to 1"),
    ("generate", {}, "give exactly one of prompt or messages"),
    ("generate", {"prompt": ""}, "prompt: String should have at least 1 character"),
    ("generate", {"prompt": "hi", "max_new_tokens": 5000}, "over this server's limit of 1024"),
    ("generate", {"prompt": "x" * 20_000}, "over this server's limit of 16000"),
    ("generate", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be"),
    ("generate", {"prompt": "hi", "temperature": 0, "do_sample": True}, "do_sample=true needs temperature > 0"),
    ("generate", {"messages": [{"role": "user", "content": "x"}], "raw": True}, "raw applies to prompt only"),
    ("generate", {"prompt": "hi", "model": "sft-000000000000"}, "no job 'sft-000000000000'"),
    ("generate", {"prompt": "hi", "model": "{cancelled}"}, "cancelled; start that stage again"),
    ("generate", {"prompt": "hi", "model": "/etc"}, "is outside the allowed folders"),
    ("cancel", {}, "job_id: Field required"),
    ("cancel", {"job_id": "x; rm -rf /"}, "job_id: String should match pattern"),
    ("cancel", {"job_id": "{succeeded}"}, "already succeeded; there is nothing to cancel"),
]


async def test_every_tool_rejects_bad_input_with_a_clear_error(make_settings, home, tmp_path):
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    async with serving(make_settings()) as (client, _):
        jobs = {**await _finished_jobs(client, home), "sft_sample": str(SFT_SAMPLE)}
        for tool, arguments, expected in BAD_INPUTS:
            arguments = json.loads(json.dumps(arguments).replace("{succeeded}", jobs["succeeded"])
                                   .replace("{cancelled}", jobs["cancelled"])
                                   .replace("{dpo_of_cancelled}", jobs["dpo_of_cancelled"])
                                   .replace("{sft_sample}", jobs["sft_sample"]))
            result = await client.call_tool(tool, arguments)
            text = error_text(result)
            assert expected in text, f"{tool}({arguments}) -> {text}"
            assert "Traceback" not in text and len(text) < 1200, text
        # the server still serves after all of that
        assert not (await client.call_tool("status", {})).is_error


async def test_broken_dataset_rows_are_reported_before_queueing(make_settings, home):
    data = home / "data"
    (data / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json}\n')
    (data / "nocolumn.jsonl").write_text('{"text": "hello"}\n')
    async with serving(make_settings()) as (client, _):
        for name, expected in (("broken.jsonl", "line 2 is not valid JSON"), ("nocolumn.jsonl", "messages")):
            text = error_text(await client.call_tool("start_sft", {**TINY_SFT, "dataset": str(data / name)}))
            assert expected in text, text
        assert (await client.call_tool("status", {})).structured_content["queue"] == []
    assert list((home / "jobs").iterdir()) == []  # nothing half-created


async def test_queue_limit(make_settings):
    async with serving(make_settings(max_queued_jobs=2)) as (client, _):
        for _ in range(2):
            assert not (await client.call_tool("start_sft", TINY_SFT)).is_error
        text = error_text(await client.call_tool("start_sft", TINY_SFT))
        assert "the queue already holds 2 jobs (limit 2)" in text and "TINYLLAMA_MCP_MAX_QUEUED_JOBS" in text


async def test_symlink_out_of_a_data_root_is_refused(make_settings, home, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    (home / "data" / "inside.jsonl").symlink_to(outside)
    async with serving(make_settings()) as (client, _):
        text = error_text(await client.call_tool("start_sft", {**TINY_SFT, "dataset": str(home / "data" / "inside.jsonl")}))
        assert "symlink that points outside" in text


@pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")  # resources/subscribe is the older protocol's way
async def test_resource_updates_reach_legacy_subscribers(make_settings):
    """resources/subscribe (protocol <= 2025-11-25): a change to the job sends notifications/resources/updated."""
    updates: list[str] = []

    async def on_message(message) -> None:
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/resources/updated":
            updates.append(root.params.uri)

    async with serving(make_settings(), mode="legacy", message_handler=on_message) as (client, _):
        assert client.server_capabilities.resources.subscribe
        job_id = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
        await client.subscribe_resource(f"jobs://{job_id}")
        await client.call_tool("cancel", {"job_id": job_id})
        with anyio.fail_after(10):
            while f"jobs://{job_id}" not in updates:
                await anyio.sleep(0.05)


async def test_resource_updates_reach_listen_streams(make_settings):
    """subscriptions/listen (protocol 2026-07-28): the same change arrives as a ResourceUpdated event."""
    async with serving(make_settings()) as (client, _):
        job_id = (await client.call_tool("start_sft", TINY_SFT)).structured_content["job_id"]
        uri = f"jobs://{job_id}"
        async with client.listen(resource_subscriptions=[uri]) as subscription:
            await client.call_tool("cancel", {"job_id": job_id})
            with anyio.fail_after(10):
                async for event in subscription:
                    if getattr(event, "uri", None) == uri:
                        break
