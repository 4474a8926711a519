"""Streaming: server-sent events from a request's choices, in the shapes an endpoint's `Chunks` formats.

The response begins only once the first choice has produced something (text, a result or an error), so a full
queue (429), a prompt over the context or a refused request still gets its status and OpenAI's error body instead
of a stream that fails after a 200. A later failure is sent as an `error` event before `[DONE]`. A client that goes
away cancels its choices' waits. Text arrives as the cumulative text so far (pipeline engine's on_text), and
`TextDeltas` turns it into the new part, holding back what may still change.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Protocol

import anyio

from tinyllama_mcp.pipeline.generation_result import GenerationResult
from tinyllama_mcp.server.openai_api.errors import from_generation
from tinyllama_mcp.server.openai_api.listing import ModelCard
from tinyllama_mcp.server.openai_api.runs import Choice, generate
from tinyllama_mcp.server.services import Services

DONE = b"data: [DONE]\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


class Chunks(Protocol):
    """What an endpoint sends for each event: lists of chunk objects (each becomes one `data:` line)."""

    def start(self) -> list[dict]: ...
    def text(self, choice: Choice, text: str) -> list[dict]: ...
    def done(self, choice: Choice, result: GenerationResult) -> list[dict]: ...
    def end(self) -> list[dict]: ...


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


class TextDeltas:
    """The new part of a growing text. `strip`: the final text is stripped (chat), so leading whitespace is
    dropped and trailing whitespace waits until more text follows it; `hold(text)`: hold everything while true
    (a tool-call turn in the making); a tail that may begin a stop string, or a character cut short, waits too."""

    def __init__(self, *, strip: bool, stops: list[str], hold: Optional[Callable[[str], bool]] = None) -> None:
        self.strip, self.stops, self.hold = strip, stops, hold
        self.sent = ""

    def _safe(self, text: str) -> str:
        text = text.rstrip("\ufffd")  # the start of a character whose other bytes are still to come
        if self.strip:
            text = text.lstrip()
            if self.hold is not None and self.hold(text):
                return ""
            text = text.rstrip()
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text

    def update(self, text: str) -> str:
        return self._advance(self._safe(text))

    def finish(self, final: str) -> str:
        """The rest of the final text (nothing when what was sent is not its start: it cannot be taken back)."""
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class GenerationStream:
    """An ASGI response streaming `choices` of `card` as `chunks` formats them."""

    def __init__(self, svc: Services, card: ModelCard, choices: list[Choice], chunks: Chunks) -> None:
        self.svc, self.card, self.choices, self.chunks = svc, card, choices, chunks

    async def __call__(self, scope, receive, send) -> None:
        events_in, events = anyio.create_memory_object_stream(math.inf)

        async def run(choice: Choice) -> None:
            async def progress(tokens: float, total: Optional[float], text: Optional[str]) -> None:
                events_in.send_nowait(("text", choice, text or ""))

            try:
                events_in.send_nowait(("done", choice, await generate(self.svc, self.card, choice, progress)))
            except Exception as exc:
                events_in.send_nowait(("error", choice, exc))

        async def watch_disconnect(scope_to_cancel: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope_to_cancel.cancel()

        async with anyio.create_task_group() as group:
            for choice in self.choices:
                group.start_soon(run, choice)
            group.start_soon(watch_disconnect, group.cancel_scope)
            first = await events.receive()
            if first[0] == "error":
                await _send_error(send, from_generation(first[2]))
                group.cancel_scope.cancel()
                return
            try:
                await self._stream(send, first, events)
            except OSError:  # the client went away mid-stream
                pass
            except Exception as exc:  # a failure after the 200: the client is told in the stream
                error = from_generation(exc)
                await send({"type": "http.response.body", "body": sse(error.body()) + DONE, "more_body": False})
            group.cancel_scope.cancel()

    async def _stream(self, send, event, events) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await self._body(send, self.chunks.start())
        pending = len(self.choices)
        while True:
            kind, choice, value = event
            if kind == "text":
                await self._body(send, self.chunks.text(choice, value))
            elif kind == "done":
                await self._body(send, self.chunks.done(choice, value))
                pending -= 1
            else:
                await self._body(send, [from_generation(value).body()])
                pending = 0
            if pending == 0:
                break
            event = await events.receive()
        if kind != "error":
            await self._body(send, self.chunks.end())
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    @staticmethod
    async def _body(send, chunks: list[dict]) -> None:
        if chunks:
            await send({"type": "http.response.body", "body": b"".join(sse(c) for c in chunks), "more_body": True})


async def _send_error(send, error) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
