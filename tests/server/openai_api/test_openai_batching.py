"""One engine for MCP generate and /v1: a seeded request's answer does not depend on what shares its batch, and the
same request through MCP generate and through /v1/chat/completions gives the same text."""

from __future__ import annotations

from functools import partial

import anyio
import httpx2

from tinyllama_mcp.server.client import TinyLlamaClient
from tests.server.openai_api.conftest import AUTH, TOKEN

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which log level should a retry use?"}]
SEEDED = {"model": "tiny-demo", "messages": CHAT, "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 42}


async def _post(http: httpx2.AsyncClient, url: str, body: dict) -> dict:
    response = await http.post(url, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_seeded_answers_ignore_their_batch(v1_server):
    chat, completions = f"{v1_server.v1}/chat/completions", f"{v1_server.v1}/completions"
    raw = {"model": "tiny-demo", "prompt": "The release checklist", "max_tokens": 24, "temperature": 1.0, "seed": 9}
    async with httpx2.AsyncClient(timeout=120, headers=AUTH) as http:
        alone = (await _post(http, chat, SEEDED))["choices"][0]["message"]["content"]
        alone_raw = (await _post(http, completions, raw))["choices"][0]["text"]
        for round_ in range(2):
            answers: dict[str, str] = {}

            async def seeded() -> None:
                answers["chat"] = (await _post(http, chat, SEEDED))["choices"][0]["message"]["content"]

            async def seeded_raw() -> None:
                answers["raw"] = (await _post(http, completions, raw))["choices"][0]["text"]

            async with anyio.create_task_group() as group:
                for k in range(6):  # neighbours of other lengths and settings, some streamed
                    body = {"model": "tiny-demo", "messages": [{"role": "user", "content": "word " * (k + 1)}],
                            "max_tokens": 8 + 7 * k, "temperature": 0.3 * k, "stream": k % 2 == 1}
                    group.start_soon(partial(http.post, chat, json=body))
                group.start_soon(seeded)
                group.start_soon(seeded_raw)
            assert answers == {"chat": alone, "raw": alone_raw}, round_


async def test_mcp_generate_and_v1_agree(v1_server):
    body = {**SEEDED, "max_tokens": 16}
    async with TinyLlamaClient.http(v1_server.mcp, TOKEN) as mcp, \
            httpx2.AsyncClient(timeout=120, headers=AUTH) as http:
        results: dict[str, str] = {}

        async def through_mcp() -> None:
            out = await mcp.generate(messages=CHAT, model="tiny-demo", max_new_tokens=16, temperature=0.9, top_p=0.95,
                                     seed=42)
            results["mcp"] = out.text

        async def through_v1() -> None:
            results["v1"] = (await _post(http, f"{v1_server.v1}/chat/completions", body))["choices"][0]["message"]["content"]

        async with anyio.create_task_group() as group:  # submitted together: one batch
            group.start_soon(through_mcp)
            group.start_soon(through_v1)
    assert results["mcp"] == results["v1"]
