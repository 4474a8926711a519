"""Helpers for the server tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import anyio
from mcp import Client

from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.server.app import build_server
from tinyllama_mcp.server.runtime import Runtime
from tinyllama_mcp.server.settings import Settings
from tinyllama_mcp.server.store import JobStore

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SAMPLES = SFT_SAMPLE.parent

# Small enough to train in a second once the job process has imported torch.
TINY_SFT = dict(
    dataset=str(SFT_SAMPLE), base_model="tiny-demo", max_samples=8, max_steps=4, per_device_train_batch_size=4,
    gradient_accumulation_steps=1, max_length=64, lora_r=8, lora_alpha=16, quantization="none",
)
TINY_DPO = dict(
    dataset=str(DPO_SAMPLE), max_samples=8, max_steps=2, per_device_train_batch_size=4,
    gradient_accumulation_steps=1, max_length=64, lora_r=8, lora_alpha=16, quantization="none",
)


def prepare_home(home: Path, shared_cache: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "data").mkdir(exist_ok=True)
    if not (home / "cache").exists():
        (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    return home


@asynccontextmanager
async def serving(settings: Settings, *, run_worker: bool = False, mode: str = "auto", **client_kwargs
                  ) -> AsyncIterator[tuple[Client, Runtime]]:
    """The real MCP server in this process, with the SDK's in-memory client connected to it."""
    runtime = Runtime(settings, run_worker=run_worker)
    server = build_server(runtime)
    async with runtime.running(), Client(server, mode=mode, **client_kwargs) as client:
        yield client, runtime


def error_text(result) -> str:
    assert result.is_error, f"expected an error, got {result.structured_content}"
    return " ".join(block.text for block in result.content)


async def wait_state(client: Client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout_s=120.0) -> dict:
    with anyio.fail_after(timeout_s):
        while True:
            result = await client.call_tool("status", {"job_id": job_id, "log_lines": 30})
            job = result.structured_content["job"]
            if job["state"] in states:
                return job
            await anyio.sleep(0.2)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def read_events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_of(home: Path) -> JobStore:
    return JobStore(home / "queue.sqlite3")
