"""/v1/models is the job store: a real tiny-demo SFT job and a merge of it, run by the server's worker, appear
under their ids and output_names with their lineage, are served (the adapter in the base model's batch), and
disappear when their artifacts are removed, with no reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import httpx2
import pytest

from tinyllama_mcp.server.client import TinyLlamaClient
from tests.server.openai_api.conftest import AUTH, TOKEN, start_server
from tests.server.support import SAMPLES, TINY_SFT, prepare_home

pytestmark = pytest.mark.slow


def _models(http: httpx2.Client, server) -> dict[str, dict]:
    return {m["id"]: m for m in http.get(f"{server.v1}/models").json()["data"]}


async def _chat(http: httpx2.AsyncClient, server, model: str, seed: int) -> str:
    response = await http.post(f"{server.v1}/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "How do I name a feature branch?"}],
        "max_tokens": 16, "temperature": 1.0, "seed": seed})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def test_models_follow_the_job_store(tmp_path, shared_cache):
    home = prepare_home(tmp_path / "home", shared_cache)
    server = start_server(home, shared_cache, TINYLLAMA_MCP_WORKER="1", TINYLLAMA_MCP_POLL_INTERVAL_S="0.2",
                          TINYLLAMA_MCP_DATA_ROOTS=str(SAMPLES))
    try:
        async with TinyLlamaClient.http(server.mcp, TOKEN) as mcp:
            sft = await mcp.start_sft(**TINY_SFT, output_name="v1-sft")
            with httpx2.Client(timeout=60, headers=AUTH) as http:
                waiting = http.get(f"{server.v1}/models/v1-sft")
                assert waiting.status_code == 404 and "still" in waiting.json()["error"]["message"]
                assert "v1-sft" not in _models(http, server)
            done = await mcp.wait(sft.job_id, poll_s=0.3, timeout_s=240)
            assert done.state == "succeeded", done
            merge = await mcp.merge(sft_job_id=sft.job_id, output_name="v1-merged")
            assert (await mcp.wait(merge.job_id, poll_s=0.3, timeout_s=240)).state == "succeeded"

        with httpx2.Client(timeout=60, headers=AUTH) as http:
            models = _models(http, server)
            for name in (sft.job_id, "v1-sft"):
                assert models[name]["parent"] == "tiny-demo" and models[name]["root"] == "tiny-demo"
                assert models[name]["owned_by"] == "tinyllama-mcp" and models[name]["object"] == "model"
            for name in (merge.job_id, "v1-merged"):
                assert models[name]["parent"] == sft.job_id and models[name]["root"] == "tiny-demo"
            assert list(models)[0] == "tiny-demo"
            assert http.get(f"{server.v1}/models/v1-merged").json() == models["v1-merged"]

        # the adapter is served on tiny-demo's engine: seeded answers do not change when they share a batch
        async with httpx2.AsyncClient(timeout=120, headers=AUTH) as http:
            names = ["tiny-demo", "v1-sft", sft.job_id, "v1-merged"]
            alone = {name: await _chat(http, server, name, seed=3) for name in names}
            assert alone["v1-sft"] == alone[sft.job_id]
            together: dict[str, str] = {}

            async def one(name: str) -> None:
                together[name] = await _chat(http, server, name, seed=3)

            async with anyio.create_task_group() as group:
                for name in names:
                    group.start_soon(one, name)
                for k in range(4):  # more rows in the batch, unseeded
                    group.start_soon(_chat, http, server, "v1-sft" if k % 2 else "tiny-demo", 100 + k)
            assert together == alone

        # artifacts removed: the SFT job is gone from the list and its names answer 404, the merge stays
        shutil.rmtree(Path(home / "jobs" / sft.job_id / "adapter"))
        with httpx2.Client(timeout=60, headers=AUTH) as http:
            models = _models(http, server)
            assert sft.job_id not in models and "v1-sft" not in models and "v1-merged" in models
            gone = http.post(f"{server.v1}/chat/completions", json={
                "model": "v1-sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert gone.status_code == 404 and "removed" in gone.json()["error"]["message"]
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
