"""Fixtures for the security and fault tests: the server tests' isolated homes and clean environment."""

from __future__ import annotations

from tests.server.conftest import clean_env, home, make_settings, shared_cache  # noqa: F401  (pytest fixtures)
