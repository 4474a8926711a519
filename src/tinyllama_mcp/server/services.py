"""What the tools work with: the settings, the job store, the loaded generators, the worker slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from tinyllama_mcp.server.alias_store import AliasStore
from tinyllama_mcp.server.generation import GeneratorCache
from tinyllama_mcp.server.settings import Settings
from tinyllama_mcp.server.store import JobStore


@dataclass
class Services:
    """What the tools work with; one per server process."""

    settings: Settings
    store: JobStore
    generators: GeneratorCache = field(default_factory=GeneratorCache)
    devices: list[Optional[str]] = field(default_factory=list)  # GPU id per worker slot (None: CPU)
    worker_enabled: bool = True

    @cached_property
    def aliases(self) -> AliasStore:
        """The named aliases, in the job store's database (tables made on first use)."""
        return AliasStore(self.store)
