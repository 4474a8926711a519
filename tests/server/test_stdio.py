"""The server over stdio, started exactly as agents.example.toml's [mcp_servers.tinyllama] block says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tinyllama_mcp.server.client import TinyLlamaClient
from tests.server.support import REPO, TINY_SFT, store_of, wait_for


def test_the_server_imports_no_model_stack_at_start_up():
    code = ("import sys, tinyllama_mcp.server.cli, tinyllama_mcp.server.app, tinyllama_mcp.server.transports, "
            "tinyllama_mcp.server.worker, tinyllama_mcp.server.client; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plain_jsonrpc_session_as_the_toml_says(tmp_path):
    """examples/jsonrpc_stdio.py: initialize, tools/list, tools/call, with nothing but JSON on stdout."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}  # the example passes its whole environment on
    out = subprocess.run([sys.executable, str(REPO / "examples" / "jsonrpc_stdio.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["server"]["name"] == "tinyllama-mcp" and summary["exit_status"] == 0
    assert summary["tools"] == ["start_sft", "start_dpo", "merge", "status", "generate", "cancel", "promote", "rollback", "aliases", "wait",
        "export", "evaluate", "compare", "compare_results", "judge"]
    assert summary["status"]["jobs"] == [] and summary["status"]["devices"].startswith("slot 0")
    # A first start in a home answers once the MCP SDK has imported (about 1.8 s on an idle 2-core machine),
    # never torch (10+ s more); later starts answer from the handshake cache (test_stdio_front.py). The bound
    # is loose because CI machines are shared; the import test above is the strict check.
    print(f"initialize {summary['initialize_s']}s, initialize + tools/list {summary['initialize_and_tools_list_s']}s")
    assert summary["initialize_and_tools_list_s"] < 10.0
    assert (tmp_path / "tinyllama-mcp" / "queue.sqlite3").is_file()


async def test_sdk_client_from_the_toml_block_queues_a_job(tmp_path, monkeypatch):
    # The SDK's stdio client passes a host's usual variables (HOME, PATH, ...) plus the block's env,
    # so the server's default home follows HOME here, as it does under a real host.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(REPO)  # the working directory is a data root: the bundled samples are inside it
    async with TinyLlamaClient.from_config(REPO / "agents.example.toml", "tinyllama") as client:
        job = await client.start_sft(**TINY_SFT)
        assert job.state == "queued"
        assert job.job_dir.startswith(str(tmp_path / ".local" / "share" / "tinyllama-mcp" / "jobs"))
        cancelled = await client.cancel(job.job_id)  # no need to train here
        assert cancelled.previous_state in ("queued", "running")
        status = await client.status(job.job_id)
        assert status.job.job_id == job.job_id
        assert status.job.state == "cancelled" or status.job.cancel_requested
        with pytest.raises(Exception) as exc:
            await client.status("sft-000000000000")
        assert "no job 'sft-000000000000'" in str(exc.value)


def test_sigterm_from_the_host_requeues_the_running_job(tmp_path, home):
    """A host stopping the server (SIGTERM) must not cost the job an attempt: it goes back to the queue."""
    env = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_POLL_INTERVAL_S": "0.2"}
    server = subprocess.Popen(["tinyllama-mcp", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "server.log", "ab"), env=env, text=True, cwd=REPO)

    def rpc(request_id: int, method: str, params: dict) -> dict:
        server.stdin.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        rpc(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}})
        reply = rpc(2, "tools/call", {"name": "start_sft", "arguments": {**TINY_SFT, "max_steps": 100_000}})
        job_id = reply["result"]["structuredContent"]["job_id"]
        store = store_of(home)
        pid = wait_for(lambda: store.get(job_id).pid, 60, "the job process to start")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    job = store.get(job_id)
    store.close()
    assert (job.state, job.attempts, job.attempt_errors) == ("queued", 0, [])
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
