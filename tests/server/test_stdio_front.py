"""The stdio front: the handshake answered from the SDK's remembered answers while the SDK loads."""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time

import pytest

from tinyllama_mcp.server.stdio_front import CACHE_NAME, HandshakeCache, StdioFront, fingerprint
from tests.server.support import REPO, VENV_BIN

VERSION = "2025-06-18"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
TOOLS_LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
STATUS = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "status", "arguments": {}}}


def line(message: dict) -> bytes:
    return (json.dumps(message) + "\n").encode()


def serve_session(home, cache, messages: list[dict]) -> list[dict]:
    """`tinyllama-mcp serve` over stdio: send every message at once, read one answer per request, close."""
    env = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_CACHE": str(cache)}
    # the venv's script by path: a module-scoped fixture starts servers before clean_env has set PATH
    server = subprocess.Popen([str(VENV_BIN / "tinyllama-mcp"), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        server.stdin.write(b"".join(line(m) for m in messages))
        server.stdin.flush()
        answers = [json.loads(server.stdout.readline()) for m in messages if "id" in m]
        server.stdin.close()
        assert server.wait(timeout=60) == 0, server.stderr.read().decode()[-3000:]
        assert server.stdout.read() == b""  # one answer per request, nothing else
        return answers
    finally:
        if server.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A user cache folder whose first server start stored the SDK's answers, and that start's answers."""
    cache = tmp_path_factory.mktemp("cache")
    first = serve_session(tmp_path_factory.mktemp("home"), cache, [INITIALIZE, INITIALIZED, TOOLS_LIST, STATUS])
    return cache, first


def test_the_first_start_stores_the_sdks_answers_for_every_protocol_version(learned):
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

    cache, first = learned
    stored = json.loads((cache / CACHE_NAME).read_text())
    assert stored["fingerprint"] == fingerprint()
    assert stored["versions"][VERSION] == {"initialize": first[0]["result"], "tools_list": first[1]["result"]}
    assert sorted(stored["versions"]) == sorted(HANDSHAKE_PROTOCOL_VERSIONS)
    for version, answers in stored["versions"].items():
        assert answers["initialize"]["protocolVersion"] == version
        assert answers["tools_list"] == first[1]["result"]
    assert [tool["name"] for tool in first[1]["result"]["tools"]] == ["start_sft", "start_dpo", "merge", "status", "generate", "cancel", "promote", "rollback", "aliases", "wait",
        "export", "evaluate", "compare", "compare_results", "judge"]


def test_a_later_start_in_another_home_answers_the_same_and_the_sdk_serves_the_rest(learned, tmp_path):
    cache, first = learned
    again = serve_session(tmp_path, cache, [INITIALIZE, INITIALIZED, TOOLS_LIST, STATUS])
    by_id = {answer["id"]: answer for answer in again}
    assert sorted(by_id) == [1, 2, 3]  # the SDK's own answer to the replayed initialize was dropped
    assert by_id[1]["result"] == first[0]["result"] and by_id[2]["result"] == first[1]["result"]
    assert by_id[3]["result"]["structuredContent"]["jobs"] == []  # answered by the SDK after it loaded


def test_a_host_on_another_protocol_version_gets_that_versions_answers(learned, tmp_path):
    cache, _ = learned
    stored = json.loads((cache / CACHE_NAME).read_text())["versions"]
    version = min(stored)
    initialize = json.loads(json.dumps(INITIALIZE))
    initialize["params"]["protocolVersion"] = version
    answers = serve_session(tmp_path, cache, [initialize, INITIALIZED, TOOLS_LIST])
    assert [answer["result"] for answer in answers] == [stored[version]["initialize"], stored[version]["tools_list"]]


class Wire:
    """A StdioFront on two pipes, with an SDK 'load' that waits until the test lets it finish."""

    def __init__(self, cache: HandshakeCache) -> None:
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.front = StdioFront(os.fdopen(in_r, "rb"), os.fdopen(out_w, "wb"), cache)
        self.loaded = threading.Event()
        self.result: list = []
        self.front.start_reader()
        self.front.load_in_background(lambda: self.loaded.wait(30) and "sdk")
        self.thread = threading.Thread(target=lambda: self.result.append(self.front.serve_until_ready()))
        self.thread.start()

    def send(self, *messages: dict) -> None:
        os.write(self.in_w, b"".join(line(m) for m in messages))

    def read(self, timeout_s: float = 10.0) -> dict | None:
        ready, _, _ = select.select([self.out_r], [], [], timeout_s)
        if not ready:
            return None
        data = b""
        while not data.endswith(b"\n"):
            data += os.read(self.out_r, 1)
        return json.loads(data)

    def finish_loading(self, replayed: int) -> None:
        """Let the 'SDK' finish once the front has taken in `replayed` lines for it."""
        deadline = time.monotonic() + 10
        while len(self.front.replay) < replayed and time.monotonic() < deadline:
            time.sleep(0.01)
        self.loaded.set()
        self.thread.join(10)
        assert self.result == ["sdk"]


def test_the_handshake_is_answered_before_the_sdk_has_loaded(learned):
    cache, first = learned
    wire = Wire(HandshakeCache(cache / CACHE_NAME, fingerprint()))
    ping = {"jsonrpc": "2.0", "id": "p", "method": "ping"}
    wire.send(INITIALIZE, INITIALIZED, TOOLS_LIST, ping)
    assert wire.read() == {"jsonrpc": "2.0", "id": 1, "result": first[0]["result"]}
    assert wire.read() == {"jsonrpc": "2.0", "id": 2, "result": first[1]["result"]}
    assert not wire.loaded.is_set()  # both answers came while the 'SDK' was still loading
    wire.finish_loading(replayed=3)
    # The SDK reads initialize (its answer is dropped), initialized and ping; never the tools/list.
    assert [json.loads(raw).get("id") for raw in wire.front.replay] == [1, None, "p"]
    # What the SDK then writes: its answer to the replayed initialize is dropped, the ping's goes out.
    wire.front._outgoing(json.dumps({"jsonrpc": "2.0", "id": 1, "result": first[0]["result"]}) + "\n")
    wire.front._outgoing(json.dumps({"jsonrpc": "2.0", "id": "p", "result": {}}) + "\n")
    assert wire.read() == {"jsonrpc": "2.0", "id": "p", "result": {}}


@pytest.mark.parametrize("case", ["stale fingerprint", "other protocol version", "malformed initialize"])
def test_nothing_is_answered_early_without_a_matching_entry(learned, case):
    folder, _ = learned
    cache = HandshakeCache(folder / CACHE_NAME, "stale" if case == "stale fingerprint" else fingerprint())
    initialize = json.loads(json.dumps(INITIALIZE))
    if case == "other protocol version":
        initialize["params"]["protocolVersion"] = "2024-11-05-unknown"
    if case == "malformed initialize":
        del initialize["params"]["clientInfo"]
    wire = Wire(cache)
    wire.send(initialize, INITIALIZED, TOOLS_LIST)
    wire.finish_loading(replayed=3)  # the SDK is ready: what came before it is all in the replay, unanswered
    assert len(wire.front.replay) == 3
    assert wire.read(timeout_s=0.2) is None


def test_the_sdks_answers_replace_a_stale_cache(tmp_path, learned):
    _, first = learned
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = {"fingerprint": "from an older install", "versions": {VERSION: {"initialize": {}, "tools_list": {}}}}
    (cache / CACHE_NAME).write_text(json.dumps(stale))
    again = serve_session(tmp_path / "home", cache, [INITIALIZE, INITIALIZED, TOOLS_LIST])
    assert [answer["result"] for answer in again] == [first[0]["result"], first[1]["result"]]
    assert json.loads((cache / CACHE_NAME).read_text())["fingerprint"] == fingerprint()
