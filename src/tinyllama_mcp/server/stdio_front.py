"""Answer a host's `initialize` and `tools/list` over stdio while the MCP SDK is still loading.

Importing the SDK takes about 1.5 s on a 2-core machine (it builds a pydantic model for every protocol
type), and a host waits for `initialize` and `tools/list` before it shows the server as ready. Those two
answers depend only on this package's code and the installed mcp and pydantic, not on the server home,
so the SDK's own answers are remembered in the user's cache folder (`handshake.json` in
TINYLLAMA_MCP_CACHE, else ~/.cache/tinyllama-mcp), under a fingerprint of both, for every protocol
version the SDK speaks (asked of it in memory once it has loaded). A later start answers from that file
within a fraction of a second, with the SDK still loading in a thread; then the SDK takes over:

- everything the client sent meanwhile is replayed into the SDK in order, so its session state (the
  handshake) is its own. Its answer to the replayed `initialize` is dropped (the client has one already);
- a `tools/list` answered early is not replayed; every other request waits for the SDK.

Without a matching entry (the first start after an install, a code or library change, a protocol version
the SDK does not speak) nothing is answered early: the SDK answers, and its answers are stored. Only the
`initialize` handshake is ever answered early; a client of the 2026 protocol (no handshake) talks to the
SDK alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.server import __version__

log = logging.getLogger("tinyllama_mcp")

CACHE_NAME = "handshake.json"
# What the two answers are built from: the SDK and pydantic (schemas), and this package's code.
FINGERPRINT_DISTRIBUTIONS = ("mcp", "mcp-types", "pydantic", "pydantic-core")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT_SOURCES = (
    "server/*.py", "pipeline/specs.py", "pipeline/data.py", "pipeline/messages.py", "pipeline/chat.py", "*.py",
)


def fingerprint() -> str:
    digest = hashlib.sha256(f"tinyllama-mcp {__version__}\n".encode())
    for name in FINGERPRINT_DISTRIBUTIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{name}=={version}\n".encode())
    for pattern in FINGERPRINT_SOURCES:
        for path in sorted(_PACKAGE_ROOT.glob(pattern)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _parse(line: bytes | str) -> Optional[dict]:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def _id_key(message: dict) -> Optional[str]:
    """A request's id as a dict key that keeps 1 and "1" apart; None for notifications."""
    return json.dumps(message["id"]) if "id" in message and message["id"] is not None else None


def _is_plain_handshake(message: dict) -> bool:
    """An `initialize` the SDK would accept: only then may it be answered before the SDK has seen it."""
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("protocolVersion"), str):
        return False
    info = params.get("clientInfo")
    return (isinstance(params.get("capabilities"), dict) and isinstance(info, dict)
            and isinstance(info.get("name"), str) and isinstance(info.get("version"), str))


def _is_first_page_tools_list(message: dict) -> bool:
    params = message.get("params")
    return params is None or (isinstance(params, dict) and set(params) <= {"_meta"})


class HandshakeCache:
    """`{fingerprint, versions: {requested protocol version: {initialize, tools_list}}}` in one JSON file."""

    def __init__(self, path: Path, fingerprint_value: str) -> None:
        self.path, self.fingerprint = path, fingerprint_value
        self.versions: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint_value and isinstance(data.get("versions"), dict):
                self.versions = data["versions"]
        except (OSError, ValueError, AttributeError):
            pass  # absent, unreadable or from an older layout: the SDK answers this time

    def answers(self, version: str) -> Optional[dict[str, Any]]:
        entry = self.versions.get(version)
        return entry if isinstance(entry, dict) and {"initialize", "tools_list"} <= set(entry) else None

    def store(self, version: str, kind: str, result: Any) -> None:
        # Called from the SDK's writer thread and from the event loop: one writer at a time.
        with self._lock:
            entry = self.versions.setdefault(version, {})
            if entry.get(kind) == result:
                return
            entry[kind] = result
            if {"initialize", "tools_list"} <= set(entry):
                self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # servers starting at the same time read a whole file
            write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "versions": self.versions}))
        except OSError as exc:  # a read-only cache folder only costs start-up speed
            log.debug("could not save the handshake cache %s: %r", self.path, exc)


async def remember_every_version(lowlevel, cache: HandshakeCache) -> None:
    """Ask the loaded SDK, over an in-memory connection, its handshake answers for each protocol version it
    speaks that the cache lacks, and store them: the next start answers any host early."""
    import anyio
    import mcp_types
    from mcp.shared.message import SessionMessage
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

    for version in HANDSHAKE_PROTOCOL_VERSIONS:
        if cache.answers(version) is not None:
            continue
        client_send, server_read = anyio.create_memory_object_stream(4)
        server_send, client_read = anyio.create_memory_object_stream(4)
        messages = [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": version, "capabilities": {},
                        "clientInfo": {"name": "tinyllama-mcp", "version": "0"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        ]
        async with anyio.create_task_group() as group:
            group.start_soon(lowlevel.run, server_read, server_send, lowlevel.create_initialization_options())
            for message in messages:
                await client_send.send(SessionMessage(mcp_types.jsonrpc_message_adapter.validate_python(message)))
                if "id" in message:
                    answer = (await client_read.receive()).message
                    # serialized as the stdio transport serializes it
                    result = json.loads(answer.model_dump_json(by_alias=True, exclude_unset=True)).get("result")
                    if result is None:
                        raise RuntimeError(f"the SDK refused the {message['method']} of protocol {version}: {answer}")
                    cache.store(version, "initialize" if message["id"] == 1 else "tools_list", result)
            await client_send.aclose()  # the in-memory session ends


class StdioFront:
    """Owns the stdio wire: answers early where it can, then feeds the SDK through `source` and `sink`."""

    def __init__(self, wire_in: BinaryIO, wire_out: BinaryIO, cache: HandshakeCache) -> None:
        self.wire_in, self.wire_out, self.cache = wire_in, wire_out, cache
        self.events: queue.Queue = queue.Queue()  # ("line", bytes) | ("eof", None) | ("ready", value) | ("error", exc)
        self.replay: list[bytes] = []  # what the SDK must still read, in arrival order
        self.answered: dict[str, Any] = {}  # id -> the result sent early (the SDK's answer to it is dropped)
        self.watched: dict[str, tuple[str, str]] = {}  # id -> (kind, version): SDK answers to remember
        self.version: Optional[str] = None  # the protocol version the client asked for in initialize
        self.handshake_answered = False
        self.eof = False
        self._write_lock = threading.Lock()

    # -------------------------------------------------------------- before the SDK is ready

    def start_reader(self) -> None:
        def read() -> None:
            try:
                for line in iter(self.wire_in.readline, b""):
                    if line.strip():
                        self.events.put(("line", line))
            finally:
                self.events.put(("eof", None))

        threading.Thread(target=read, name="stdio-reader", daemon=True).start()

    def load_in_background(self, load: Callable[[], Any]) -> None:
        """Run `load` (the SDK imports) in a thread; serve_until_ready returns its value or raises its error."""
        def run() -> None:
            try:
                self.events.put(("ready", load()))
            except BaseException as exc:  # handed to the main thread, which reports it
                self.events.put(("error", exc))

        threading.Thread(target=run, name="sdk-loader", daemon=True).start()

    def serve_until_ready(self) -> Any:
        while True:
            kind, item = self.events.get()
            if kind == "ready":
                return item
            if kind == "error":
                raise item
            if kind == "eof":
                self.eof = True
            else:
                self._early(item)

    def _early(self, line: bytes) -> None:
        message = self._watch(line)
        method = message.get("method") if message else None
        key = _id_key(message) if message else None
        if method == "initialize" and key and not self.handshake_answered and _is_plain_handshake(message):
            answers = self.cache.answers(message["params"]["protocolVersion"])
            if answers is not None:
                self._send({"jsonrpc": "2.0", "id": message["id"], "result": answers["initialize"]})
                self.answered[key] = answers["initialize"]
                self.handshake_answered = True
        elif method == "tools/list" and key and self.handshake_answered and _is_first_page_tools_list(message):
            self._send({"jsonrpc": "2.0", "id": message["id"], "result": self.cache.answers(self.version)["tools_list"]})
            self.watched.pop(key, None)
            return  # answered for good: the SDK never sees it
        self.replay.append(line)

    def _watch(self, line: bytes) -> Optional[dict]:
        """Note the ids of handshake requests whose SDK answers belong in the cache."""
        message = _parse(line)
        if message is None:
            return None
        method, key = message.get("method"), _id_key(message)
        if key and method == "initialize" and _is_plain_handshake(message) and self.version is None:
            self.version = message["params"]["protocolVersion"]
            self.watched[key] = ("initialize", self.version)
        elif key and method == "tools/list" and self.version is not None and _is_first_page_tools_list(message):
            self.watched[key] = ("tools_list", self.version)
        return message

    def _send(self, message: dict) -> None:
        self._write((json.dumps(message, separators=(",", ":")) + "\n").encode())

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            self.wire_out.write(data)
            self.wire_out.flush()

    # -------------------------------------------------------------- the SDK's streams

    def source(self) -> "_Source":
        """Lines for the SDK's stdio transport: the replayed ones, then the wire's."""
        return _Source(self)

    def sink(self) -> "_Sink":
        return _Sink(self)

    def _outgoing(self, text: str) -> None:
        """One message line from the SDK: drop the answer to a replayed early request, remember handshakes."""
        if self.answered or self.watched:
            message = _parse(text)
            key = _id_key(message) if message else None
            if key in self.watched and "result" in message:
                kind, version = self.watched.pop(key)
                self.cache.store(version, kind, message["result"])
            if key in self.answered:
                sent = self.answered.pop(key)
                if message.get("result") != sent:
                    log.warning("the SDK's initialize answer differs from the one sent early; the handshake "
                                "cache %s is replaced", self.cache.path)
                return
        self._write(text.encode())


class _Source:
    """What `mcp.server.stdio.stdio_server` iterates as its stdin: str lines."""

    def __init__(self, front: StdioFront) -> None:
        self.front = front

    def __aiter__(self) -> "_Source":
        return self

    async def __anext__(self) -> str:
        import anyio.to_thread

        front = self.front
        if front.replay:
            return front.replay.pop(0).decode("utf-8", errors="replace")
        while not front.eof:
            kind, item = await anyio.to_thread.run_sync(front.events.get, abandon_on_cancel=True)
            if kind == "eof":
                front.eof = True
            elif kind == "line":
                front._watch(item)
                return item.decode("utf-8", errors="replace")
        raise StopAsyncIteration


class _Sink:
    """What `stdio_server` writes to as its stdout: whole message lines."""

    def __init__(self, front: StdioFront) -> None:
        self.front = front

    async def write(self, text: str) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.front._outgoing, text)

    async def flush(self) -> None:
        return None  # each line is flushed as it is written


def claim_stdio() -> tuple[BinaryIO, BinaryIO]:
    """Private handles on the wire; fd 0 then reads the null device and fd 1 writes to stderr.

    As the SDK's own stdio transport does: a stray print (ours, a library's, a child's) must not land in
    the protocol stream, and children must not read the host's messages.
    """
    wire_in = os.fdopen(os.dup(0), "rb")
    wire_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return wire_in, wire_out
