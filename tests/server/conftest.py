"""Fixtures for the server tests: an isolated home per test, real libraries throughout.

Every test gets its own server home (queue database, jobs/), while the embedded tiny-demo model is
created once per session in a shared cache folder that each home's cache/ links to.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinyllama_mcp.server.settings import Settings
from tests.server.support import SAMPLES, VENV_BIN, prepare_home

_CLEARED = ("HF_GENERATE_KWARGS", "HF_LOCAL_MODEL_PATH", "PREFER_LLM_PROVIDER", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    # The pipeline's own cache (TINYLLAMA_MCP_CACHE, else ~/.cache/tinyllama-mcp): tiny-demo is
    # deterministic and versioned, so building it once for every test session is enough.
    from tinyllama_mcp.pipeline.tiny_demo import cache_dir

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, shared_cache):
    for name in list(os.environ):
        if name.startswith("TINYLLAMA_MCP_") or name in _CLEARED:
            monkeypatch.delenv(name)
    # No network here: make hub look-ups fail at once instead of waiting for a timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINYLLAMA_MCP_CACHE", str(shared_cache))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def home(tmp_path, shared_cache) -> Path:
    return prepare_home(tmp_path / "home", shared_cache)


@pytest.fixture
def make_settings(home):
    def make(**overrides) -> Settings:
        values = dict(home=home, data_roots=[SAMPLES], poll_interval_s=0.2, lease_ttl_s=4.0)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, shared_cache):
    """SFT -> DPO -> merge on tiny-demo, trained once for the session (tests/server/chain.py)."""
    from tests.server.chain import train_chain

    return train_chain(tmp_path_factory.mktemp("chain"), shared_cache)
