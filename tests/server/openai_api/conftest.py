"""A real `tinyllama-mcp serve --transport http` for the /v1 tests, started as a user starts it (token on)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from tests.server.support import VENV_BIN, free_port, prepare_home

TOKEN = "v1-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Server:
    port: int
    home: Path
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def mcp(self) -> str:
        return f"{self.url}/mcp"

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)


def server_env(home: Path, shared_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINYLLAMA_MCP_") and k not in ("HF_GENERATE_KWARGS", "HF_LOCAL_MODEL_PATH")}
    env.update({
        "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_TOKEN": TOKEN, "TINYLLAMA_MCP_CACHE": str(shared_cache),
        "HF_HUB_OFFLINE": "1", "TINYLLAMA_MCP_WORKER": "0", "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    env.update(extra)
    return env


def start_server(home: Path, shared_cache: Path, *, transport: str = "http", **extra: str) -> Server:
    """`tinyllama-mcp serve --transport <transport>` on a free port, `extra` added to its environment."""
    port = free_port()
    log = home.parent / f"server-{port}.log"
    process = subprocess.Popen(
        ["tinyllama-mcp", "serve", "--transport", transport, "--port", str(port)],
        env=server_env(home, shared_cache, **extra), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )
    server = Server(port, home, process, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx2.get(f"{server.v1}/models", headers=AUTH, timeout=2).status_code == 200:
                return server
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the HTTP server did not start: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def v1_server(tmp_path_factory, shared_cache):
    """One server per test module (worker off), tiny-demo loaded on first use."""
    home = prepare_home(tmp_path_factory.mktemp("v1") / "home", shared_cache)
    server = start_server(home, shared_cache)
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.fixture
def openai_client(v1_server):
    from openai import OpenAI

    with OpenAI(base_url=v1_server.v1, api_key=TOKEN, max_retries=0, timeout=120) as client:
        yield client
