"""generate through MCP: partial text arrives as progress notifications; concurrent calls are batched."""

from __future__ import annotations

import anyio

from tests.server.support import serving


async def test_generate_streams_partial_text_as_progress(make_settings):
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with serving(make_settings()) as (client, _):
        args = {"prompt": "How do I name a feature branch?", "model": "tiny-demo", "max_new_tokens": 48,
                "temperature": 0.0}
        streamed = await client.call_tool("generate", args, progress_callback=on_progress)
        plain = await client.call_tool("generate", args)
    assert not streamed.is_error, streamed
    out = streamed.structured_content
    assert updates, "no progress notification arrived"
    counts = [p for p, _, _ in updates]
    assert counts == sorted(counts) and all(total == 48 for _, total, _ in updates)
    # Every partial text is a prefix of the final answer, and the last one is the answer.
    for _, _, message in updates:
        assert out["text"].startswith(message.strip())
    assert updates[-1][2].strip() == out["text"]
    assert plain.structured_content["text"] == out["text"]  # streaming changes nothing in the result


async def test_concurrent_generate_calls_each_get_their_own_answer(make_settings):
    prompts = ["How do I name a feature branch?", "What time is the stand-up?", "Where do secrets live?"]
    async with serving(make_settings()) as (client, _):
        alone = {}
        for p in prompts:
            result = await client.call_tool("generate", {"prompt": p, "model": "tiny-demo", "max_new_tokens": 24,
                                                         "temperature": 0.0})
            alone[p] = result.structured_content["text"]
        together = {}

        async def ask(p: str) -> None:
            result = await client.call_tool("generate", {"prompt": p, "model": "tiny-demo", "max_new_tokens": 24,
                                                         "temperature": 0.0})
            together[p] = result.structured_content["text"]

        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(ask, p)
    assert together == alone  # greedy answers do not depend on what else is in the batch
