"""Running the server over stdio, Streamable HTTP or SSE, and guarding the HTTP side.

HTTP and SSE bind 127.0.0.1 by default. Every HTTP request passes `HttpGuard` first:
- the Host header must name this server (loopback names, the bind address, TINYLLAMA_MCP_ALLOWED_HOSTS)
  and a browser's Origin must too, else 403: a web page cannot reach the server through DNS
  rebinding;
- when a bearer token is configured (TINYLLAMA_MCP_TOKEN), requests without it get 401.
Serving on a non-loopback address without a token is refused at start. The SDK's own Host/Origin
check and request body limit stay on behind the guard. The OpenAI-compatible /v1 routes (server.openai_api)
are mounted beside /mcp (or /sse) behind the same guard, whose refusals there are OpenAI-shaped JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
from typing import Optional
from urllib.parse import urlsplit

import anyio

from tinyllama_mcp.server.app import build_server
from tinyllama_mcp.server.runtime import Runtime
from tinyllama_mcp.server.stdio_front import StdioFront, remember_every_version
from tinyllama_mcp.errors import UserError

log = logging.getLogger("tinyllama_mcp")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: Optional[str]) -> None:
    if not is_loopback(host) and not token:
        raise UserError(
            f"refusing to serve on {host} without a bearer token: anyone who reaches the port could start "
            "training and read models. Set TINYLLAMA_MCP_TOKEN (clients send 'Authorization: Bearer <token>'), "
            "or bind 127.0.0.1"
        )


def allowed_hostnames(bind_host: str, extra: list[str]) -> set[str]:
    names = {*LOOPBACK_HOSTS, *(name.lower() for name in extra)}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(bind_host.strip("[]").lower())
    return names


def _hostname(netloc: str) -> Optional[str]:
    """'example.com:8000' -> 'example.com', '[::1]:80' -> '::1'; None when unparsable."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


class HttpGuard:
    """ASGI middleware: Host/Origin allow-list (403), then the bearer token (401)."""

    def __init__(self, app, *, hostnames: set[str], token: Optional[str]) -> None:
        self.app = app
        self.hostnames = hostnames
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        openai = _is_v1(scope.get("path", ""))
        if _hostname(headers.get("host", "")) not in self.hostnames:
            await _reply(send, 403, "Host not allowed: connect through an allowed name (TINYLLAMA_MCP_ALLOWED_HOSTS)",
                         openai=openai)
            return
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme not in ("http", "https") or parts.hostname not in self.hostnames:
                await _reply(send, 403, "Origin not allowed", openai=openai)
                return
        if self.token is not None:
            scheme, _, credential = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), self.token):
                await _reply(send, 401, "Missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                             [(b"www-authenticate", b'Bearer realm="tinyllama-mcp"')], openai=openai)
                return
        await self.app(scope, receive, send)


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def _reply(send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = (), *,
                 openai: bool = False) -> None:
    """A refusal: plain text, or OpenAI's error JSON on /v1 paths (clients there parse it)."""
    if openai:
        from tinyllama_mcp.server.openai_api.errors import error_bytes

        body, kind = error_bytes(status, message), b"application/json"
    else:
        body, kind = message.encode(), b"text/plain; charset=utf-8"
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra_headers],
    })
    await send({"type": "http.response.body", "body": body})


def http_app(runtime: Runtime, transport: str, host: str):
    """The Starlette app of the MCP server, with the OpenAI-compatible /v1 routes beside it, behind the guard."""
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.routing import Mount

    from tinyllama_mcp.server.openai_api import build_v1_app

    settings = runtime.settings
    token = settings.token.get_secret_value() if settings.token else None
    check_bind(host, token)
    names = allowed_hostnames(host, settings.allowed_hosts)
    bracketed = [f"[{name}]" if ":" in name else name for name in names]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*bracketed, *(f"{name}:*" for name in bracketed)],
        allowed_origins=[f"{scheme}://{name}{port}" for scheme in ("http", "https") for name in bracketed
                         for port in ("", ":*")],
    )
    server = build_server(runtime)
    if transport == "http":
        app = server.streamable_http_app(
            transport_security=security, max_request_body_size=settings.max_request_bytes, host=host
        )
    else:
        app = server.sse_app(transport_security=security, max_request_body_size=settings.max_request_bytes, host=host)
    # A route of the SDK's own app, so its lifespan (the MCP session manager) runs as before.
    app.router.routes.insert(0, Mount("/v1", app=build_v1_app(runtime.services)))
    return HttpGuard(app, hostnames=names, token=token)


async def _exit_on_signals(runtime: Runtime) -> None:
    """SIGTERM/SIGINT from the host: hand running jobs back to the queue, then leave.

    The SDK reads stdin in a thread that cancellation cannot interrupt, so the server cannot unwind
    normally while it waits for input; the workers are stopped here and the process exits at once.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            await runtime.stop_workers()
            os._exit(0)


async def serve_stdio(runtime: Runtime, front: StdioFront) -> None:
    """The SDK serves the connection that `front` holds (and may have answered the handshake of)."""
    from mcp.server.stdio import stdio_server

    server = build_server(runtime)
    lowlevel = server._lowlevel_server  # MCPServer.run_stdio_async reads the process's own stdin
    remembered = anyio.Event()

    async def remember() -> None:
        try:
            await remember_every_version(lowlevel, front.cache)
        except Exception as exc:  # only the next start's speed depends on it
            log.warning("could not store the handshake answers for the next start: %r", exc)
        finally:
            remembered.set()

    async with runtime.running(), anyio.create_task_group() as group:
        group.start_soon(_exit_on_signals, runtime)
        group.start_soon(remember)
        async with stdio_server(front.source(), front.sink()) as (read_stream, write_stream):
            # returns when the host closes our stdin
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
        with anyio.move_on_after(5):  # a host that closes at once still leaves the answers stored
            await remembered.wait()
        group.cancel_scope.cancel()


async def serve_http(runtime: Runtime, transport: str, host: str, port: int) -> None:
    import uvicorn

    app = http_app(runtime, transport, host)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down. With SIGTERM's default action
    # that would kill the process before the workers hand their running jobs back to the queue.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    async with runtime.running():
        path = "/mcp" if transport == "http" else "/sse"
        log.info("serving MCP over %s at http://%s:%s%s and the OpenAI API at http://%s:%s/v1", transport, host, port,
                 path, host, port)
        await server.serve()
