"""Helpers shared by the security tests: a long-lived in-memory server driven from synchronous code."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import anyio.from_thread
import pytest

from tinyllama_mcp.server.settings import Settings
from tests.server.support import SAMPLES, VENV_BIN, prepare_home, serving

# Text that must never reach a caller: it means an exception escaped a tool (a server bug).
# The SDK words every deliberate tool error "Error executing tool <name>: <message>"; a crash (an
# exception other than the tool's own error) reaches the caller as the bare prefix, with no message.
INTERNAL_MARKERS = ("Traceback", 'File "/', "Internal error", "object has no attribute", "NoneType")


class Session:
    """The real server app and the SDK's in-memory client, on an event loop in a helper thread."""

    def __init__(self, portal, client, runtime, home: Path) -> None:
        self.portal, self.client, self.runtime, self.home = portal, client, runtime, home
        self.calls = 0

    def call(self, tool: str, arguments: Any):
        self.calls += 1
        return self.portal.call(self.client.call_tool, tool, arguments)

    def check(self, tool: str, arguments: Any):
        """Call a tool and assert the outcome is a result or a clear one-line error, never a crash."""
        result = self.call(tool, arguments)
        if result.is_error:
            text = " ".join(getattr(block, "text", "") for block in result.content)
            assert text.strip(), f"{tool}: empty error for {arguments!r}"
            assert "\n" not in text.strip(), f"{tool}: multi-line error {text[:500]!r}"
            prefix = f"Error executing tool {tool}: "
            assert text.startswith(prefix) and text[len(prefix):].strip(), f"{tool}: crash {text!r} for {str(arguments)[:300]}"
            assert len(text) < 20_000, f"{tool}: a {len(text)}-character error"
            for marker in INTERNAL_MARKERS:
                assert marker not in text, f"{tool}: internal error text {text[:500]!r} for {str(arguments)[:300]}"
        else:
            assert result.structured_content is not None, f"{tool}: success without structured content"
        return result

    def alive(self) -> None:
        result = self.call("status", {})
        assert not result.is_error and "jobs" in result.structured_content


@contextmanager
def session(home: Path, shared_cache: Path, **overrides: Any) -> Iterator[Session]:
    """Module-scoped server: environment set like tests/server's clean_env, worker off."""
    prepare_home(home, shared_cache)
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("TINYLLAMA_MCP_") or name in ("HF_GENERATE_KWARGS", "HF_LOCAL_MODEL_PATH",
                                                             "PREFER_LLM_PROVIDER", "CUDA_VISIBLE_DEVICES"):
                mp.delenv(name)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TINYLLAMA_MCP_CACHE", str(shared_cache))
        mp.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        values = dict(home=home, data_roots=[SAMPLES], poll_interval_s=0.2, lease_ttl_s=4.0)
        values.update(overrides)
        settings = Settings(**values)
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(serving(settings)) as (client, runtime):
                yield Session(portal, client, runtime, home)
