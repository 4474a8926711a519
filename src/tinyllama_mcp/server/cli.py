"""`tinyllama-mcp`: serve (stdio, http, sse), worker, demo.

Imports are deferred to the command that needs them: a host starting `tinyllama-mcp serve` over
stdio waits for every module loaded here before its `initialize` is answered.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from tinyllama_mcp.server import __version__


def _configure_logging(verbose: bool) -> None:
    # stderr only: over stdio, stdout is the protocol channel.
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("mcp", "httpx", "httpx2", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllama-mcp",
        description="MCP server through which agents fine-tune (SFT -> DPO -> merge) and query a small local LLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (to stderr)")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the MCP server (default: over stdio, as agent hosts start it)")
    serve.add_argument("--transport", choices=("stdio", "http", "sse"), default="stdio",
                       help="stdio (default), http (Streamable HTTP at /mcp) or sse (legacy, at /sse)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP/SSE bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP/SSE port (default 8765)")
    serve.add_argument("--no-worker", action="store_true",
                       help="do not run jobs in this process (leave them to `tinyllama-mcp worker`)")

    commands.add_parser("worker", help="run jobs from the queue until stopped (one per GPU), without serving MCP")

    demo = commands.add_parser("demo", help="run SFT -> DPO -> merge -> generate on tiny-demo through the server")
    demo.add_argument("--home", help="server home for the demo (default: a fresh temporary folder)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    command = args.command or "serve"
    try:
        if command == "serve":
            return _serve(args)
        if command == "worker":
            return _worker()
        if command == "demo":
            from tinyllama_mcp.server.demo import run_demo

            return run_demo(home=args.home)
    except KeyboardInterrupt:
        return 130
    raise AssertionError(command)


def _load_server_stack():
    """Import the MCP SDK and the server modules, and read the settings (the slow part of a start)."""
    import gc

    # The MCP SDK builds hundreds of pydantic models at import; the cyclic garbage collector finds
    # nothing to free meanwhile but costs about a tenth of the start-up a host waits for.
    gc.disable()
    try:
        import anyio  # noqa: F401

        import tinyllama_mcp.server.runtime  # noqa: F401
        import tinyllama_mcp.server.transports  # noqa: F401
        from tinyllama_mcp.server.settings import load_settings
    finally:
        gc.enable()
    return load_settings()


def _serve(args: argparse.Namespace) -> int:
    transport = getattr(args, "transport", "stdio")
    run_worker = False if getattr(args, "no_worker", False) else None
    if transport == "stdio":
        return _serve_stdio(run_worker)
    try:
        settings = _load_server_stack()
        import anyio

        from tinyllama_mcp.server.runtime import Runtime
        from tinyllama_mcp.server.transports import check_bind, serve_http

        check_bind(args.host, settings.token.get_secret_value() if settings.token else None)
        anyio.run(serve_http, Runtime(settings, run_worker=run_worker), transport, args.host, args.port)
    except Exception as exc:
        return _user_error_exit(exc)
    return 0


def _user_error_exit(exc: Exception) -> int:
    """A UserError becomes one line on stderr and exit status 2; anything else propagates."""
    from tinyllama_mcp.errors import UserError

    if not isinstance(exc, UserError):
        raise exc
    print(f"tinyllama-mcp: {exc}", file=sys.stderr)
    return 2


def _serve_stdio(run_worker: Optional[bool]) -> int:
    """Over stdio the handshake is answered from the cache while the SDK loads (server/stdio_front.py)."""
    from tinyllama_mcp.pipeline.tiny_demo import cache_dir
    from tinyllama_mcp.server.stdio_front import CACHE_NAME, HandshakeCache, StdioFront, claim_stdio, fingerprint

    wire_in, wire_out = claim_stdio()
    cache = HandshakeCache(cache_dir() / CACHE_NAME, fingerprint())
    front = StdioFront(wire_in, wire_out, cache)
    front.start_reader()
    front.load_in_background(_load_server_stack)
    try:
        settings = front.serve_until_ready()
        import anyio

        from tinyllama_mcp.server.runtime import Runtime
        from tinyllama_mcp.server.transports import serve_stdio

        anyio.run(serve_stdio, Runtime(settings, run_worker=run_worker), front)
    except Exception as exc:
        return _user_error_exit(exc)
    return 0


def _worker() -> int:
    import signal
    import threading

    from tinyllama_mcp.server.settings import load_settings
    from tinyllama_mcp.server.worker import WorkerPool

    settings = load_settings()
    settings.ensure_dirs()
    pool = WorkerPool(settings)
    stopped = threading.Event()

    def stop(signum, frame) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pool.start()
    devices = ", ".join("CPU" if gpu is None else f"GPU {gpu}" for gpu in pool.devices)
    logging.getLogger("tinyllama_mcp").info("worker running on %s; home %s", devices, settings.home)
    while not stopped.wait(0.5):
        pass
    pool.stop()  # running jobs stop and return to the queue; they resume from their checkpoints
    return 0


if __name__ == "__main__":
    sys.exit(main())
