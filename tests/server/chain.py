"""A real tiny-demo chain trained once per session by the server's own worker: SFT -> DPO -> merge; and evaluate or
export jobs of it recorded through the store, their files written in the stages' contract shapes."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tinyllama_mcp.server.settings import Settings
from tests.server.support import (
    SAMPLES, TINY_DPO, TINY_SFT, VENV_BIN, error_text, prepare_home, serving, store_of, wait_state,
)


@dataclass(frozen=True)
class Chain:
    home: Path
    sft: str
    dpo: str
    merge: str

    def settings(self, **overrides) -> Settings:
        values = dict(home=self.home, data_roots=[SAMPLES], poll_interval_s=0.2, lease_ttl_s=4.0)
        return Settings(**{**values, **overrides})


async def _train(settings: Settings) -> tuple[str, str, str]:
    async with serving(settings, run_worker=True) as (client, _):
        async def start(tool: str, arguments: dict) -> str:
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, error_text(result)
            return result.structured_content["job_id"]

        sft = await start("start_sft", {**TINY_SFT, "output_name": "chain-sft"})
        dpo = await start("start_dpo", {**TINY_DPO, "sft_job_id": sft})
        merge = await start("merge", {"dpo_job_id": dpo, "output_name": "chain-merged"})
        for job_id in (sft, dpo, merge):
            job = await wait_state(client, job_id, timeout_s=300)
            assert job["state"] == "succeeded", job
    return sft, dpo, merge


def train_chain(folder: Path, shared_cache: Path) -> Chain:
    home = prepare_home(folder / "home", shared_cache)
    with pytest.MonkeyPatch.context() as env:  # what clean_env does per test, for this session-wide training
        for name in list(os.environ):
            if name.startswith("TINYLLAMA_MCP_") or name in ("HF_GENERATE_KWARGS", "HF_LOCAL_MODEL_PATH"):
                env.delenv(name)
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("CUDA_VISIBLE_DEVICES", "")
        env.setenv("TINYLLAMA_MCP_CACHE", str(shared_cache))
        env.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        ids = anyio.run(_train, Chain(home, "", "", "").settings())
    return Chain(home, *ids)


def record_job(home: Path, stage: str, parent: str, label: str, files: dict[str, str]) -> str:
    """An evaluate or export job of `parent` taken through the store as a worker takes it (enqueue, claim,
    finish), its output files written in the contract shape (metrics.json, manifest.json) by the caller."""
    store = store_of(home)
    try:
        job_id = f"{stage}-{secrets.token_hex(6)}"
        job_dir = home / "jobs" / job_id
        merged = home / "jobs" / parent / "merged"
        model = merged if merged.is_dir() else home / "jobs" / parent / "adapter"
        spec = {"stage": stage, "model": str(model), "model_label": label, "parents": [parent]}
        store.enqueue(job_id=job_id, stage=stage, spec=spec, parents=[parent], job_dir=job_dir, name=None,
                      max_attempts=1, max_queued=100)
        assert store.acquire_lease(7, "record-job", os.getpid(), "test", ttl_s=30)
        claimed = store.claim(7, "record-job", "test")
        assert claimed is not None and claimed.id == job_id
        for relative, text in files.items():
            (job_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (job_dir / relative).write_text(text)
        assert store.finish(job_id, "record-job", "succeeded")
        store.release_lease(7, "record-job")
        return job_id
    finally:
        store.close()
