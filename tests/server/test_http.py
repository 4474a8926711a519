"""Streamable HTTP and SSE: the bearer token, Host/Origin checks, body limit, the refused public bind, and clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx2
import pytest

from tinyllama_mcp.server.client import ConfigError, HuggingFaceProvider, LLMDisabled, TinyLlamaClient, ToolCallError
from tests.server.support import free_port

TOKEN = "test-token-0123456789"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _serve(home: Path, transport: str, port: int, log: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_TOKEN": TOKEN,
                   "TINYLLAMA_MCP_MAX_REQUEST_BYTES": "4096", **env}
    process = subprocess.Popen(["tinyllama-mcp", "serve", "--transport", transport, "--port", str(port)],
                               env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=open(log, "ab"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the HTTP server did not start")


@pytest.fixture
def http_server(home, tmp_path):
    port = free_port()
    process = _serve(home, "http", port, tmp_path / "http.log", TINYLLAMA_MCP_WORKER="0")
    yield f"http://127.0.0.1:{port}/mcp", port
    process.terminate()
    assert process.wait(timeout=30) == 0


def test_http_guards(http_server):
    url, port = http_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx2.Client(timeout=10) as http:
        missing = http.post(url, json=INITIALIZE, headers=MCP_HEADERS)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Bearer nope"}).status_code == 401
        assert http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": TOKEN}).status_code == 401
        foreign_origin = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **auth, "Origin": "http://evil.example"})
        assert foreign_origin.status_code == 403
        # a DNS-rebinding page: the browser sends the attacker's host name
        foreign_host = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **auth, "Host": f"evil.example:{port}"})
        assert foreign_host.status_code == 403
        too_big = http.post(url, content=json.dumps({**INITIALIZE, "pad": "x" * 8000}), headers={**MCP_HEADERS, **auth})
        assert too_big.status_code == 413
        ok = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **auth, "Origin": f"http://localhost:{port}"})
        assert ok.status_code == 200, ok.text


async def test_typed_client_over_http(http_server):
    url, _ = http_server
    async with TinyLlamaClient.http(url, TOKEN) as client:
        status = await client.status()
        assert status.jobs == [] and status.workers == []
        with pytest.raises(ToolCallError) as exc:
            await client.cancel("sft-000000000000")
        assert exc.value.tool == "cancel" and str(exc.value).startswith("no job 'sft-000000000000'")


async def test_huggingface_provider_reads_an_agents_block_and_generates_over_http(http_server, tmp_path, monkeypatch):
    url, _ = http_server
    config = tmp_path / "agents.toml"
    config.write_text(f"""
[mcp_servers.remote]
url = "{url}"
bearer_token_env_var = "MY_TOKEN"

[agents.helper]
llm_provider = "huggingface"
model = "tiny-demo"
hf_generate_kwargs = {{ max_new_tokens = 6, temperature = 0.0 }}
use_llm = true
mcp_server = "remote"

[agents.quiet]
llm_provider = "huggingface"
use_llm = false
mcp_server = "remote"
""")
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    async with HuggingFaceProvider.from_config(config, "helper") as llm:
        out = await llm.generate("What does the release checklist start with?")
        assert out.model == "tiny-demo" and 1 <= out.usage.completion_tokens <= 6
        assert isinstance(await llm.complete(messages=[{"role": "user", "content": "hi"}]), str)
    async with HuggingFaceProvider.from_config(config, "quiet") as llm:
        with pytest.raises(LLMDisabled):
            await llm.complete("hi")
    monkeypatch.setenv("PREFER_LLM_PROVIDER", "openai")
    with pytest.raises(ConfigError, match="asks for llm_provider 'openai' .from PREFER_LLM_PROVIDER."):
        async with HuggingFaceProvider.from_config(config, "helper"):
            pass
    monkeypatch.delenv("PREFER_LLM_PROVIDER")
    with pytest.raises(ConfigError, match=r"no \[agents.missing\] block"):
        async with HuggingFaceProvider.from_config(config, "missing"):
            pass
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(ConfigError, match="MY_TOKEN is not set"):
        async with HuggingFaceProvider.from_config(config, "helper"):
            pass


def test_sse_transport_needs_the_token_too(home, tmp_path):
    port = free_port()
    process = _serve(home, "sse", port, tmp_path / "sse.log", TINYLLAMA_MCP_WORKER="0")
    try:
        with httpx2.Client(timeout=10) as http:
            assert http.get(f"http://127.0.0.1:{port}/sse").status_code == 401
            with http.stream("GET", f"http://127.0.0.1:{port}/sse", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                first = next(resp.iter_lines())
                assert first.startswith("event: endpoint")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_public_bind_without_a_token_is_refused(home):
    env = {key: value for key, value in os.environ.items() if key != "TINYLLAMA_MCP_TOKEN"}
    out = subprocess.run(["tinyllama-mcp", "serve", "--transport", "http", "--host", "0.0.0.0", "--port", str(free_port())],
                         env={**env, "TINYLLAMA_MCP_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to serve on 0.0.0.0 without a bearer token" in out.stderr
    assert "TINYLLAMA_MCP_TOKEN" in out.stderr
