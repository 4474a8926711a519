"""Security guards seen from the tools: job ids, limits under concurrency, the job environment, remote code."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import anyio
import pytest

from tinyllama_mcp.server.worker import job_environment
from tests.server.support import REPO, TINY_SFT, error_text, serving

SECRET = "bearer-secret-do-not-leak-42"


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "sft-000000000000/../x", "sft-%2e%2e", "SFT-000000000000",
                                    "sft-00000000000", "sft-0000000000000", "x" * 100, "sft-00000000000\u0661"])
async def test_job_ids_are_validated_in_every_tool_and_the_resource(make_settings, job_id):
    async with serving(make_settings()) as (client, _):
        for tool, arguments in (("status", {"job_id": job_id}), ("cancel", {"job_id": job_id}),
                                ("merge", {"sft_job_id": job_id}), ("merge", {"dpo_job_id": job_id}),
                                ("start_dpo", {"sft_job_id": job_id, "dataset": "x.jsonl"})):
            text = error_text(await client.call_tool(tool, arguments))
            assert "should match pattern" in text or "at most 21 characters" in text, (tool, text)
        with pytest.raises(Exception) as exc:
            await client.read_resource(f"jobs://{job_id}")
        assert "not a job id" in str(exc.value) or "Unknown resource" in str(exc.value) or "not found" in str(exc.value).lower()


async def test_queue_limit_holds_under_concurrent_calls(make_settings):
    """Twelve start_sft calls at once against a limit of 3: exactly 3 queue, the rest get the clear error."""
    async with serving(make_settings(max_queued_jobs=3)) as (client, runtime):
        results = []

        async def one() -> None:
            results.append(await client.call_tool("start_sft", TINY_SFT))

        async with anyio.create_task_group() as group:
            for _ in range(12):
                group.start_soon(one)
        ok = [r for r in results if not r.is_error]
        refused = [error_text(r) for r in results if r.is_error]
        assert len(ok) == 3 and len(refused) == 9
        assert all("the queue already holds 3 jobs (limit 3)" in text for text in refused), refused
        assert len(runtime.store.queued()) == 3
    # refused calls leave no job folders behind
    assert len(list((runtime.settings.jobs_dir).iterdir())) == 3


async def test_generate_limits_follow_the_configuration(make_settings):
    async with serving(make_settings(max_new_tokens=8, max_prompt_chars=100)) as (client, _):
        text = error_text(await client.call_tool("generate", {"prompt": "hi", "max_new_tokens": 9}))
        assert "max_new_tokens 9 is over this server's limit of 8" in text and "TINYLLAMA_MCP_MAX_NEW_TOKENS" in text
        # the limit counts the whole chat, not one message
        chat = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 60}]
        text = error_text(await client.call_tool("generate", {"messages": chat, "max_new_tokens": 2}))
        assert "the prompt is 120 characters, over this server's limit of 100" in text
        # a default from HF_GENERATE_KWARGS above the limit is refused too (not silently used)
        assert not (await client.call_tool("status", {})).is_error


async def test_default_generation_settings_cannot_exceed_the_limit(make_settings):
    async with serving(make_settings(max_new_tokens=8, hf_generate_kwargs={"max_new_tokens": 64})) as (client, _):
        text = error_text(await client.call_tool("generate", {"prompt": "hi", "model": "tiny-demo"}))
        assert "max_new_tokens 64 is over this server's limit of 8" in text


def test_job_environment_never_carries_the_token(make_settings, monkeypatch):
    monkeypatch.setenv("TINYLLAMA_MCP_TOKEN", SECRET)
    monkeypatch.setenv("AUTHORIZATION", f"Bearer {SECRET}")
    monkeypatch.setenv("HF_TOKEN", "hf_hub_token")  # the hub's own token may pass; ours never
    settings = make_settings(token=SECRET)
    for gpu in (None, "0"):
        env = job_environment(settings, gpu)
        assert not any(SECRET in f"{key}={value}" for key, value in env.items()), env
        assert not any(key.startswith("TINYLLAMA_MCP_") and key != "TINYLLAMA_MCP_CACHE" for key in env), env


def test_trust_remote_code_is_never_enabled_in_the_code():
    """Grep-style: no call in the packages or the benchmarks passes trust_remote_code (only comments mention it)."""
    offenders = []
    for folder in ("src", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"trust_remote_code", code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def _remote_code_model(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_arch", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    }))
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(payload)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer",
                                                               "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return folder


async def test_a_model_asking_for_remote_code_never_runs_it(make_settings, home, tmp_path):
    marker = tmp_path / "remote-code-ran"
    model = _remote_code_model(home / "data" / "evil-model", marker)
    data = home / "data" / "chat.jsonl"
    data.write_bytes((REPO / "src" / "tinyllama_mcp" / "pipeline" / "samples" / "sft_sample.jsonl").read_bytes())
    async with serving(make_settings()) as (client, _):
        result = await client.call_tool("generate", {"model": str(model), "prompt": "hi", "max_new_tokens": 2})
        text = error_text(result)
        assert text.startswith("Error executing tool generate: ") and len(text) > 40, text
        start = await client.call_tool("start_sft", {**TINY_SFT, "dataset": str(data), "base_model": str(model)})
        assert not (await client.call_tool("status", {})).is_error
    # and the pipeline (what a job would run) refuses to execute it too
    code = ("import sys; from tinyllama_mcp.pipeline.modeling import load_tokenizer\n"
            "try:\n    load_tokenizer(sys.argv[1])\nexcept Exception as exc:\n    print(type(exc).__name__)\n")
    subprocess.run([os.sys.executable, "-c", code, str(model)], cwd=REPO, capture_output=True, timeout=120,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not marker.exists(), "remote code from a model folder was executed"
    del start
