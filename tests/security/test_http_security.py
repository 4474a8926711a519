"""HTTP security beyond tests/server/test_http.py (which covers the plain 401/403/413 cases).

A real `tinyllama-mcp serve --transport http` on 127.0.0.1 with a token: token variants, Host and
Origin tricks, every method and path behind the guard, a chunked oversized body, and the refused
non-loopback binds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import httpx2
import pytest

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.transports import check_bind
from tests.server.support import free_port
from tests.server.test_http import INITIALIZE, MCP_HEADERS, TOKEN, _serve

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_cache):
    from tests.server.support import prepare_home

    home = prepare_home(tmp_path_factory.mktemp("http") / "home", shared_cache)
    port = free_port()
    from tests.server.support import VENV_BIN

    env = {"TINYLLAMA_MCP_WORKER": "0", "HF_HUB_OFFLINE": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = _serve(home, "http", port, home.parent / "http.log", **env)
    yield f"http://127.0.0.1:{port}/mcp", port
    process.terminate()
    assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN.upper()}",
    f"Bearer  {TOKEN} extra", f"Token {TOKEN}", f"Bearer {TOKEN}\u00e9".encode("utf-8"),
])
def test_wrong_tokens_get_401(server, authorization):
    url, _ = server
    headers = dict(MCP_HEADERS)
    if authorization is not None:
        headers["Authorization"] = authorization
    with httpx2.Client(timeout=10) as http:
        response = http.post(url, json=INITIALIZE, headers=headers)
    assert response.status_code == 401, (authorization, response.status_code)
    assert TOKEN not in response.text


@pytest.mark.parametrize("method,path", [("GET", "/mcp"), ("DELETE", "/mcp"), ("GET", "/"), ("GET", "/docs"),
                                         ("GET", "/sse"), ("POST", "/messages/"), ("OPTIONS", "/mcp")])
def test_every_method_and_path_is_behind_the_token(server, method, path):
    _, port = server
    with httpx2.Client(timeout=10) as http:
        assert http.request(method, f"http://127.0.0.1:{port}{path}").status_code == 401


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "evil.example@127.0.0.1",
                                  "0.0.0.0", "10.0.0.1", "[::2]", "", "localhost:80@evil"])
def test_foreign_host_headers_are_rejected(server, host):
    url, port = server
    with httpx2.Client(timeout=10) as http:
        response = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **AUTH, "Host": host})
    assert 400 <= response.status_code < 500 and response.status_code != 404, (host, response.status_code)


def test_missing_host_header_is_rejected(server):
    _, port = server
    body = json.dumps(INITIALIZE).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /mcp HTTP/1.0\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Accept: application/json, text/event-stream\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        status_line = sock.recv(200).split(b"\r\n")[0]
    assert int(status_line.split()[1]) in (400, 403), status_line


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "file://", "ftp://localhost", "http://localhost.evil.example",
                                    "https://127.0.0.1.nip.io", "chrome-extension://abc", "http://[::1]@evil.example"])
def test_foreign_origins_are_rejected(server, origin):
    url, _ = server
    with httpx2.Client(timeout=10) as http:
        response = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **AUTH, "Origin": origin})
    assert response.status_code == 403, (origin, response.status_code)


def test_loopback_origins_and_hosts_are_served(server):
    url, port = server
    with httpx2.Client(timeout=10) as http:
        for extra in ({"Origin": f"http://127.0.0.1:{port}"}, {"Host": f"localhost:{port}"}, {"Origin": "https://localhost"}):
            response = http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **AUTH, **extra})
            assert response.status_code == 200, (extra, response.text)


def test_oversized_bodies_get_413_with_or_without_a_length(server):
    url, _ = server  # the fixture's server allows 4096 bytes (TINYLLAMA_MCP_MAX_REQUEST_BYTES in _serve)
    big = json.dumps({**INITIALIZE, "pad": "x" * 100_000}).encode()

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    with httpx2.Client(timeout=20) as http:
        assert http.post(url, content=big, headers={**MCP_HEADERS, **AUTH}).status_code == 413
        assert http.post(url, content=chunks(), headers={**MCP_HEADERS, **AUTH}).status_code == 413
        # the body limit is checked after the token: an anonymous sender learns nothing but 401
        assert http.post(url, content=big, headers=MCP_HEADERS).status_code == 401
        # and the server still serves
        assert http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **AUTH}).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "10.0.0.1"])
def test_non_loopback_binds_need_a_token(host):
    with pytest.raises(UserError, match=f"refusing to serve on {host} without a bearer token"):
        check_bind(host, None)
    with pytest.raises(UserError):
        check_bind(host, "")
    check_bind(host, "some-token")  # with a token it is allowed
    for loopback in ("127.0.0.1", "localhost", "::1", "127.5.5.5"):
        check_bind(loopback, None)


def test_ipv6_any_bind_without_a_token_is_refused_at_start(home):
    env = {key: value for key, value in os.environ.items() if key != "TINYLLAMA_MCP_TOKEN"}
    out = subprocess.run(["tinyllama-mcp", "serve", "--transport", "sse", "--host", "::", "--port", str(free_port())],
                         env={**env, "TINYLLAMA_MCP_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to serve on :: without a bearer token" in out.stderr
    assert "Traceback" not in out.stderr
