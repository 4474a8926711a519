"""A small typed client for scripts and agents, and the `huggingface` LLM provider built on it.

    async with TinyLlamaClient.from_config("agents.example.toml") as client:   # [mcp_servers.tinyllama]
        job = await client.start_sft(dataset="data/chat.jsonl", base_model="tiny-demo")
        done = await client.wait(job.job_id)
        print(done.state, done.summary)

    async with HuggingFaceProvider.from_config("agents.example.toml", agent="reviewer") as llm:  # [agents.reviewer]
        print(await llm.complete("How do I name a feature branch?"))

The client speaks MCP over stdio (it starts the server as a host would) or Streamable HTTP (with
the bearer token from the variable the config names). Tool errors raise `ToolCallError` carrying
the server's message; results come back as the server's own output models.
"""

from __future__ import annotations

import os
import sys
import tomllib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

import anyio
from pydantic import BaseModel

from tinyllama_mcp.server.models import CancelOutput, GenerateOutput, JobView, StartJobOutput, StatusOutput


T = TypeVar("T", bound=BaseModel)
FINAL = ("succeeded", "failed", "cancelled")


class ToolCallError(RuntimeError):
    """The server answered a tool call with an error; the message says what to change."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool


class ConfigError(ValueError):
    pass


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _server_block(config: dict[str, Any], name: str, path: Any) -> dict[str, Any]:
    block = config.get("mcp_servers", {}).get(name)
    if not isinstance(block, dict):
        known = ", ".join(config.get("mcp_servers", {})) or "none"
        raise ConfigError(f"{path} has no [mcp_servers.{name}] block (found: {known})")
    return block


class TinyLlamaClient:
    """Typed calls to the six tools over one MCP connection."""

    def __init__(self, target: Any, *, read_timeout_s: float = 600.0) -> None:
        self._target = target
        self._read_timeout_s = read_timeout_s
        self._client = None
        self._http_client = None  # ours to close, for HTTP connections

    # ---------------------------------------------------------------- connecting
    @classmethod
    def stdio(
        cls, command: str = "tinyllama-mcp", args: Optional[list[str]] = None, env: Optional[dict[str, str]] = None,
        cwd: Optional[str] = None, errlog: Optional[Any] = None,
    ) -> "TinyLlamaClient":
        """Start the server as a child process and talk over its stdin/stdout, as agent hosts do.

        The server's stderr (its log) goes to `errlog`, a file object (default: this process's stderr).
        """
        from mcp import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=command, args=list(args or ["serve"]), env=env, cwd=cwd)
        return cls(params if errlog is None else stdio_client(params, errlog=errlog))

    @classmethod
    def http(cls, url: str, token: Optional[str] = None) -> "TinyLlamaClient":
        """Connect to `tinyllama-mcp serve --transport http` (Streamable HTTP, e.g. http://127.0.0.1:8765/mcp)."""
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Long read timeout: the server may hold a response stream open while a tool works.
        http_client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=600.0))
        client = cls(streamable_http_client(url, http_client=http_client))
        client._http_client = http_client
        return client

    @classmethod
    def from_config(cls, path: str | os.PathLike, server: str = "tinyllama") -> "TinyLlamaClient":
        """Connect as an [mcp_servers.<server>] block says (Codex CLI layout): command/args/env, or url."""
        block = _server_block(load_config(path), server, path)
        if "url" in block:
            token = None
            if block.get("bearer_token_env_var"):
                token = os.environ.get(block["bearer_token_env_var"])
                if not token:
                    raise ConfigError(f"the bearer token variable {block['bearer_token_env_var']} is not set")
            return cls.http(block["url"], token)
        if "command" not in block:
            raise ConfigError(f"[mcp_servers.{server}] needs either command (stdio) or url (HTTP)")
        return cls.stdio(block["command"], list(block.get("args", [])), dict(block.get("env", {})) or None,
                         block.get("cwd"))

    async def __aenter__(self) -> "TinyLlamaClient":
        from mcp import Client

        # mode="legacy": the initialize handshake every current host performs.
        self._client = Client(self._target, mode="legacy", read_timeout_seconds=self._read_timeout_s)
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                await client.__aexit__(*exc_info)
        finally:
            if self._http_client is not None:
                await self._http_client.aclose()

    # ---------------------------------------------------------------- tools
    async def call(self, tool: str, output: type[T], arguments: dict[str, Any]) -> T:
        if self._client is None:
            raise RuntimeError("use the client inside 'async with'")
        result = await self._client.call_tool(tool, {k: v for k, v in arguments.items() if v is not None})
        if result.is_error:
            text = " ".join(block.text for block in result.content if getattr(block, "type", "") == "text")
            raise ToolCallError(tool, text.removeprefix(f"Error executing tool {tool}: "))
        return output.model_validate(result.structured_content)

    async def start_sft(self, **arguments: Any) -> StartJobOutput:
        return await self.call("start_sft", StartJobOutput, arguments)

    async def start_dpo(self, **arguments: Any) -> StartJobOutput:
        return await self.call("start_dpo", StartJobOutput, arguments)

    async def merge(self, **arguments: Any) -> StartJobOutput:
        return await self.call("merge", StartJobOutput, arguments)

    async def status(self, job_id: Optional[str] = None, **arguments: Any) -> StatusOutput:
        return await self.call("status", StatusOutput, {"job_id": job_id, **arguments})

    async def generate(self, prompt: Optional[str] = None, **arguments: Any) -> GenerateOutput:
        return await self.call("generate", GenerateOutput, {"prompt": prompt, **arguments})

    async def cancel(self, job_id: str) -> CancelOutput:
        return await self.call("cancel", CancelOutput, {"job_id": job_id})

    async def wait(
        self, job_id: str, *, poll_s: float = 1.0, timeout_s: Optional[float] = None,
        on_update: Optional[Callable[[JobView], None]] = None,
    ) -> JobView:
        """Poll status until the job is succeeded, failed or cancelled; returns its final view."""
        with anyio.fail_after(timeout_s):
            while True:
                job = (await self.status(job_id, log_lines=0)).job
                assert job is not None
                if on_update is not None:
                    on_update(job)
                if job.state in FINAL:
                    return job
                await anyio.sleep(poll_s)


class LLMDisabled(RuntimeError):
    """The agent's block says use_llm = false."""


class HuggingFaceProvider:
    """The `huggingface` llm_provider of an [agents.<name>] block, answering through generate."""

    name = "huggingface"

    def __init__(self, client: TinyLlamaClient, *, model: Optional[str] = None,
                 generate_kwargs: Optional[dict[str, Any]] = None, use_llm: bool = True) -> None:
        self.client = client
        self.model = model
        self.generate_kwargs = dict(generate_kwargs or {})
        self.use_llm = use_llm

    @classmethod
    @asynccontextmanager
    async def from_config(cls, path: str | os.PathLike, agent: str) -> AsyncIterator["HuggingFaceProvider"]:
        """Read [agents.<agent>] and connect to the MCP server it names (default [mcp_servers.tinyllama])."""
        config = load_config(path)
        block = config.get("agents", {}).get(agent)
        if not isinstance(block, dict):
            raise ConfigError(f"{path} has no [agents.{agent}] block")
        provider = os.environ.get("PREFER_LLM_PROVIDER") or block.get("llm_provider", cls.name)
        if provider != cls.name:
            raise ConfigError(
                f"[agents.{agent}] asks for llm_provider {provider!r}"
                f"{' (from PREFER_LLM_PROVIDER)' if os.environ.get('PREFER_LLM_PROVIDER') else ''}; "
                f"this provider is {cls.name!r}"
            )
        kwargs = block.get("hf_generate_kwargs", {})
        if not isinstance(kwargs, dict):
            raise ConfigError(f"[agents.{agent}] hf_generate_kwargs must be a table, e.g. {{ max_new_tokens = 256 }}")
        client = TinyLlamaClient.from_config(path, block.get("mcp_server", "tinyllama"))
        async with client:
            yield cls(client, model=block.get("model") or None, generate_kwargs=kwargs,
                      use_llm=bool(block.get("use_llm", True)))

    async def generate(self, prompt: Optional[str] = None, *, messages: Optional[list[dict]] = None,
                       **overrides: Any) -> GenerateOutput:
        if not self.use_llm:
            raise LLMDisabled("this agent is configured with use_llm = false")
        arguments = {**self.generate_kwargs, **overrides, "model": overrides.get("model", self.model)}
        if messages is not None:
            arguments["messages"] = messages
        return await self.client.generate(prompt, **arguments)

    async def complete(self, prompt: Optional[str] = None, *, messages: Optional[list[dict]] = None,
                       **overrides: Any) -> str:
        return (await self.generate(prompt, messages=messages, **overrides)).text


def _main(argv: Optional[list[str]] = None) -> int:
    """`python -m tinyllama_mcp.server.client CONFIG AGENT PROMPT`: one answer from an agent's configured model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tinyllama_mcp.server.client", description=_main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("agent")
    parser.add_argument("prompt")
    args = parser.parse_args(argv)

    async def run() -> str:
        async with HuggingFaceProvider.from_config(args.config, args.agent) as llm:
            return await llm.complete(args.prompt)

    try:
        print(anyio.run(run))
    except (ConfigError, ToolCallError, LLMDisabled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
