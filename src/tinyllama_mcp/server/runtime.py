"""What a server process keeps for its lifetime: the store, the worker threads, the job watcher.

The watcher turns job changes, whichever process made them (this one's worker, another server's,
a standalone worker), into resource-updated notifications for subscribed clients.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import anyio
import anyio.to_thread
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

from tinyllama_mcp.server.generation import GeneratorCache
from tinyllama_mcp.server.settings import Settings
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import JobStore

log = logging.getLogger("tinyllama_mcp")

MAX_SUBSCRIBERS_PER_URI = 64


class Runtime:
    """What a server process keeps for its lifetime: settings, store, workers, job watcher, subscribers."""

    def __init__(self, settings: Settings, *, run_worker: Optional[bool] = None) -> None:
        from tinyllama_mcp.server.worker import WorkerPool, slot_devices

        self.settings = settings
        settings.ensure_dirs()
        self.store = JobStore(settings.db_path)
        self.run_worker = settings.worker if run_worker is None else run_worker
        self.pool = WorkerPool(settings) if self.run_worker else None
        devices = self.pool.devices if self.pool is not None else slot_devices(settings)
        self.services = Services(
            settings=settings, store=self.store, generators=GeneratorCache(max_queue=settings.generation_queue),
            devices=devices, worker_enabled=self.run_worker,
        )
        self.bus = InMemorySubscriptionBus()
        # Sessions that subscribed with resources/subscribe (protocol <= 2025-11-25): URI -> connection -> session.
        self.subscribers: dict[str, dict[object, Any]] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator["Runtime"]:
        # The pipeline creates and caches tiny-demo here, for generate in this process too.
        os.environ["TINYLLAMA_MCP_CACHE"] = str(self.settings.cache_dir)
        if self.pool is not None:
            self.pool.start()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_jobs)
                try:
                    yield self
                finally:
                    group.cancel_scope.cancel()
        finally:
            await self.stop_workers()
            self.store.close()

    async def stop_workers(self) -> None:
        """Running jobs stop and go back to the queue (attempt given back), to resume in the next worker."""
        if self.pool is not None:
            await anyio.to_thread.run_sync(self.pool.stop)

    async def _watch_jobs(self) -> None:
        """Tell subscribers about job and alias changes, whichever process (worker, other server) made them."""
        aliases = self.services.aliases
        seen = await anyio.to_thread.run_sync(self.store.max_seq)
        seen_aliases = await anyio.to_thread.run_sync(aliases.max_seq)
        while True:
            await anyio.sleep(self.settings.poll_interval_s)
            try:
                changes = await anyio.to_thread.run_sync(self.store.changes_since, seen)
                moves = await anyio.to_thread.run_sync(aliases.changes_since, seen_aliases)
            except Exception:  # a busy or briefly locked database must not end notifications
                log.warning("could not read job changes", exc_info=True)
                continue
            for job_id in dict.fromkeys(job_id for job_id, _ in changes):
                await self.notify(f"jobs://{job_id}")
            for name in dict.fromkeys(name for name, _ in moves):
                await self.notify(f"models://{name}")
            if changes or moves:
                await self.notify("models://")
            if changes:
                seen = changes[-1][1]
            if moves:
                seen_aliases = moves[-1][1]

    def subscribe(self, uri: str, session: Any) -> None:
        # The SDK hands each request its own session object; the connection behind it is what lasts.
        sessions = self.subscribers.setdefault(uri, {})
        if len(sessions) < MAX_SUBSCRIBERS_PER_URI:
            sessions[_connection_of(session)] = session

    def unsubscribe(self, uri: str, session: Any) -> None:
        self.subscribers.get(uri, {}).pop(_connection_of(session), None)

    async def notify(self, uri: str) -> None:
        await self.bus.publish(ResourceUpdated(uri=uri))
        sessions = self.subscribers.get(uri, {})
        for key, session in list(sessions.items()):
            try:
                await session.send_resource_updated(uri)
            except Exception:  # the client went away
                sessions.pop(key, None)


def _connection_of(session: Any) -> object:
    return getattr(session, "_connection", session)
