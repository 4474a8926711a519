"""The export tool through MCP with a real worker: the session's merge job (conftest's tiny_chain) exported to GGUF, a
Modelfile and safetensors, status listing each file with its sha256 and check figures; wrong format names and adapter
formats of a merged model are refused at the call with what to pass instead."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.server.support import error_text, serving, wait_state

pytestmark = pytest.mark.slow


async def test_export_a_merge_job_through_mcp(tiny_chain):
    async with serving(tiny_chain.settings(), run_worker=True) as (client, _):
        wrong = await client.call_tool("export", {"model": "chain-merged", "formats": ["gguf-q4_k"]})
        assert "formats.0" in error_text(wrong) and "'gguf-q8_0'" in error_text(wrong)
        adapter_only = await client.call_tool("export", {"model": "chain-merged", "formats": ["gguf-f16", "peft"]})
        assert "['peft'] export a LoRA adapter" in error_text(adapter_only)

        out = await client.call_tool("export", {"model": "chain-merged", "output_name": "tiny-export"})
        assert not out.is_error, error_text(out)
        started = out.structured_content
        assert started["stage"] == "export" and started["parents"] == [tiny_chain.merge]
        job = await wait_state(client, started["job_id"], timeout_s=240)
        assert job["state"] == "succeeded", job

        files = {f["format"]: f for f in job["summary"]["files"]}
        assert set(files) == {"gguf-f16", "gguf-q8_0", "ollama", "safetensors"}  # the defaults for a whole model
        for f in files.values():
            assert f["verification"]["passed"] and len(f["sha256"]) == 64 and Path(f["path"]).exists()
        for fmt in ("gguf-f16", "gguf-q8_0"):
            v, path = files[fmt]["verification"], Path(files[fmt]["path"])
            assert 0 < v["max_abs_logit_diff"] <= v["bound"] and v["tokenizer_ids_equal"]
            assert path.name == f"tiny-export-{fmt.removeprefix('gguf-')}.gguf"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == files[fmt]["sha256"]
            assert path.stat().st_size == files[fmt]["bytes"]
        assert files["safetensors"]["verification"]["dtype"] == "bfloat16"  # the merge job's dtype, kept
        assert Path(job["artifacts"]["export"], "manifest.json").is_file()
        status = (await client.call_tool("status", {"job_id": started["job_id"]})).structured_content
        assert "llama-cli" in status["hint"]


async def test_export_a_dpo_adapter_through_mcp(tiny_chain):
    async with serving(tiny_chain.settings(), run_worker=True) as (client, _):
        out = await client.call_tool("export", {"model": tiny_chain.dpo, "formats": ["gguf-lora", "peft"]})
        assert not out.is_error, error_text(out)
        assert out.structured_content["parents"] == [tiny_chain.dpo]
        job = await wait_state(client, out.structured_content["job_id"], timeout_s=240)
        assert job["state"] == "succeeded", job
        files = {f["format"]: f for f in job["summary"]["files"]}
        assert set(files) == {"gguf-lora", "peft"} and all(f["verification"]["passed"] for f in files.values())
        manifest = json.loads(Path(job["artifacts"]["export"], "manifest.json").read_text())
        applies = {f["format"]: f["applies_to"] for f in manifest["files"]}
        # a DPO adapter trained on the SFT model applies to that model: the base with the SFT adapter merged first
        assert applies["peft"] == applies["gguf-lora"] and applies["peft"]["base_model"] == "tiny-demo"
        assert [Path(a).parent.name for a in applies["peft"]["adapters_merged_first"]] == [tiny_chain.sft]
