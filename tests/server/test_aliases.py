"""Aliases: promote and rollback through the MCP tools, every move kept and atomic under concurrent movers (threads
and processes on one database), and generate, /v1 and the huggingface provider serving a model by its alias."""

from __future__ import annotations

import subprocess
import sys
import threading

import anyio
import httpx2
import pytest

from tinyllama_mcp.server.alias_store import AliasStore
from tinyllama_mcp.server.app import build_server
from tinyllama_mcp.server.client import HuggingFaceProvider, TinyLlamaClient
from tinyllama_mcp.server.store import JobStore
from tests.server.chain import record_job
from tests.server.openai_api.conftest import AUTH, TOKEN, start_server
from tests.server.support import REPO, error_text, serving

MOVER = """
import sys, time
from pathlib import Path
from tinyllama_mcp.server.alias_store import AliasStore
from tinyllama_mcp.server.store import JobStore
db, who, moves, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
aliases = AliasStore(JobStore(db))
while not go.exists():
    time.sleep(0.005)
for i in range(moves):
    aliases.promote("production", f"{who}-{i}", reason="load test", by=who)
"""


def _check_history(aliases: AliasStore, name: str, moves: int) -> None:
    """Every move has its row, and each row starts where the one before it ended (no move was lost)."""
    history = list(reversed(aliases.history(name)))
    assert len(history) == moves
    for before, after in zip(history, history[1:]):
        assert after.previous == before.target, (before, after)
    assert aliases.get(name).target == history[-1].target and aliases.get(name).seq == history[-1].id


def test_alias_moves_are_atomic_across_threads_and_processes(tmp_path):
    db, go = tmp_path / "queue.sqlite3", tmp_path / "go"
    shared = AliasStore(JobStore(db))
    per_mover = 60
    processes = [subprocess.Popen([sys.executable, "-c", MOVER, str(db), f"process{k}", str(per_mover), str(go)],
                                  cwd=REPO) for k in range(2)]
    errors: list[BaseException] = []

    def mover(k: int) -> None:
        aliases = shared if k % 2 else AliasStore(JobStore(db))  # one connection shared by threads, or its own
        try:
            for i in range(per_mover):
                if i % 5 == 4:
                    aliases.rollback("production", reason="load test", by=f"thread{k}")
                else:
                    aliases.promote("production", f"thread{k}-{i}", reason="load test", by=f"thread{k}")
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    shared.promote("production", "first")
    threads = [threading.Thread(target=mover, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    go.touch()
    for thread in threads:
        thread.join(timeout=120)
    assert all(process.wait(timeout=120) == 0 for process in processes)
    assert not errors, errors
    _check_history(shared, "production", 1 + 6 * per_mover)
    by = {move.by for move in shared.history("production")}
    assert {"process0", "process1", "thread0", "thread3"} <= by
    assert shared.history("production", 1)[0].target == shared.get("production").target


async def test_concurrent_promote_calls_through_mcp(make_settings):
    async with serving(make_settings()) as (client, runtime):
        async def promote(k: int) -> None:
            result = await client.call_tool("promote", {"model": "tiny-demo", "alias": "busy", "reason": f"call {k}"})
            assert not result.is_error, error_text(result)

        async with anyio.create_task_group() as group:
            for k in range(12):
                group.start_soon(promote, k)
        _check_history(runtime.services.aliases, "busy", 12)
        assert {m.reason for m in runtime.services.aliases.history("busy")} == {f"call {k}" for k in range(12)}


async def test_promote_and_rollback_through_the_tools(tiny_chain):
    chain = tiny_chain
    async with serving(chain.settings()) as (client, _):
        async def call(tool: str, **arguments):
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, error_text(result)
            return result.structured_content

        first = await call("promote", model="chain-sft", alias="tools-prod", reason="first model")
        assert first["move"] == {**first["move"], "target": chain.sft, "previous": None, "action": "promote"}
        assert first["alias"]["target_output_name"] == "chain-sft" and first["alias"]["servable"]
        await call("promote", model=chain.merge, alias="tools-prod")
        await call("promote", model="tools-prod", alias="tools-candidate")  # an alias's target, taken as it is now
        assert (await call("aliases", alias="tools-candidate"))["aliases"][0]["target"] == chain.merge
        viewed = (await call("aliases", alias="tools-prod", history=10))["aliases"][0]
        assert viewed["target"] == chain.merge and viewed["rollback_to"] == chain.sft
        assert [m["target"] for m in viewed["history"]] == [chain.merge, chain.sft]
        status = (await call("status", job_id=chain.merge))["job"]
        assert {"tools-prod", "tools-candidate"} <= set(status["aliases"])

        back = await call("rollback", alias="tools-prod", reason="regressed")
        assert (back["move"]["action"], back["move"]["target"], back["move"]["previous"]) == (
            "rollback", chain.sft, chain.merge)
        no_more = await client.call_tool("rollback", {"alias": "tools-prod"})
        assert "no earlier target" in error_text(no_more) and "promote another model" in error_text(no_more)
        listed = {a["alias"]: a for a in (await call("aliases"))["aliases"]}
        assert listed["tools-prod"]["target"] == chain.sft and len(listed["tools-prod"]["history"]) == 3

        # what an alias may not be, or point at, each refused with what to do
        refused = {
            ("Production", "tiny-demo"): "lower-case letters",
            ("merge-0a1b2c", "tiny-demo"): "looks like a job id",
            ("tiny-demo", "tiny-demo"): "would hide the embedded model",
            ("chain-merged", "tiny-demo"): f"already the output_name of job {chain.merge}",
            ("ok-name", "no-such-model"): "neither a job id, an output_name, an alias",
            ("ok-name", "sft-000000000000"): "no job 'sft-000000000000'",
        }
        for (alias, model), words in refused.items():
            assert words in error_text(await client.call_tool("promote", {"model": model, "alias": alias}))
        assert "there is no alias 'never-made'" in error_text(
            await client.call_tool("rollback", {"alias": "never-made"}))
        taken = await client.call_tool("merge", {"sft_job_id": chain.sft, "output_name": "tools-prod"})
        assert "already an alias" in error_text(taken)


async def test_unfinished_and_non_model_jobs_cannot_be_promoted(tiny_chain):
    evaluation = record_job(tiny_chain.home, "evaluate", tiny_chain.dpo, tiny_chain.dpo,
                            {"evaluation/metrics.json": '{"metrics": {"valid_loss": 4.0}, "datasets": []}'})
    async with serving(tiny_chain.settings()) as (client, _):
        queued = await client.call_tool("merge", {"sft_job_id": tiny_chain.sft})
        try:
            text = error_text(await client.call_tool("promote", {"model": queued.structured_content["job_id"],
                                                                 "alias": "too-early"}))
            assert "still queued" in text
        finally:
            await client.call_tool("cancel", {"job_id": queued.structured_content["job_id"]})
        text = error_text(await client.call_tool("promote", {"model": evaluation, "alias": "not-a-model"}))
        assert "is an evaluate job, which serves no model" in text


@pytest.mark.slow
async def test_generate_v1_and_the_provider_resolve_aliases(tiny_chain, shared_cache):
    chain = tiny_chain
    ask = {"prompt": "How do I name a feature branch?", "max_new_tokens": 6, "temperature": 0}
    async with serving(chain.settings()) as (client, runtime):
        assert not (await client.call_tool("promote", {"model": "chain-merged", "alias": "serve-prod"})).is_error
        direct = (await client.call_tool("generate", {**ask, "model": chain.merge})).structured_content
        by_alias = (await client.call_tool("generate", {**ask, "model": "serve-prod"})).structured_content
        assert by_alias["text"] == direct["text"] and by_alias["model"] == f"{chain.merge} (chain-merged), alias serve-prod"

        async with TinyLlamaClient(build_server(runtime)) as typed:  # the provider, over a real MCP session
            provider = HuggingFaceProvider(typed, model="serve-prod", generate_kwargs={"max_new_tokens": 6,
                                                                                       "temperature": 0})
            assert await provider.complete(ask["prompt"]) == direct["text"]

        # an alias whose target job is gone (its row deleted) says so, and what to do
        runtime.services.aliases.promote("serve-gone", "merge-00000000dead")
        gone = error_text(await client.call_tool("generate", {**ask, "model": "serve-gone"}))
        assert "alias 'serve-gone' points at merge-00000000dead, but job merge-00000000dead no longer exists" in gone
        assert "rollback(alias='serve-gone')" in gone

    server = start_server(chain.home, shared_cache)
    try:
        from openai import NotFoundError, OpenAI

        with OpenAI(base_url=server.v1, api_key=TOKEN, max_retries=0, timeout=120) as openai:
            models = {m.id: m.model_dump() for m in openai.models.list().data}
            assert models["serve-prod"]["parent"] == chain.merge and models["serve-prod"]["root"] == "tiny-demo"
            assert models["serve-prod"]["alias_of"] == chain.merge and "serve-gone" not in models
            for name in (chain.merge, "chain-merged"):
                entry = models[name]
                assert "serve-prod" in entry["aliases"] and entry["lineage"]["chain"] == [chain.sft, chain.dpo,
                                                                                        chain.merge]
                assert entry["lineage"]["datasets"][0]["sha256"] and "metrics" in entry
            assert models["tiny-demo"]["lineage"] == {"root": "tiny-demo", "chain": [], "datasets": []}
            answer = openai.chat.completions.create(model="serve-prod", max_tokens=6, temperature=0,
                                                    messages=[{"role": "user", "content": ask["prompt"]}])
            assert answer.model == "serve-prod" and answer.choices[0].message.content == direct["text"]
            with pytest.raises(NotFoundError, match="no longer exists"):
                openai.chat.completions.create(model="serve-gone", max_tokens=2,
                                               messages=[{"role": "user", "content": "hi"}])

            # the target's files removed: the alias leaves the list and answers 404 saying why, until they are back
            merged = chain.home / "jobs" / chain.merge / "merged"
            merged.rename(merged.with_name("merged.away"))
            try:
                assert "serve-prod" not in {m.id for m in openai.models.list().data}
                with pytest.raises(NotFoundError, match="artifacts were removed"):
                    openai.chat.completions.create(model="serve-prod", max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
            finally:
                merged.with_name("merged.away").rename(merged)
            assert httpx2.get(f"{server.v1}/models/serve-prod", headers=AUTH).json()["parent"] == chain.merge
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
