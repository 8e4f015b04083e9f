"""What the API process holds for its lifetime: database and Redis pools, Celery, the waiter."""

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from api.cache import TtlCache
from api.parsing import Parsers
from api.rate_limits import RateLimiter
from api.waiter import JobWaiter
from core.queue import (
    FAILED_CHECKS_KEY,
    WORKERS_KEY,
    FailedCheck,
    WorkerBeat,
    live_beats,
    recent_failed_checks,
)
from core.settings import ApiSettings


@dataclass
class ApiContext:
    settings: ApiSettings
    engine: AsyncEngine
    sessions: async_sessionmaker
    redis: aioredis.Redis
    celery: Celery
    waiter: JobWaiter
    # API keys by hash and served models by name, read once per FERRY_LOOKUP_CACHE_SECONDS.
    lookups: TtlCache = field(default_factory=lambda: TtlCache(0))
    # Jobs whose results reached their clients, to be marked delivered (api.stored).
    delivered: set[str] = field(default_factory=set)
    # Batches this process validates or that wait for one of its validation slots, and the
    # processes that parse their lines (api.batches).
    validating: set[str] = field(default_factory=set)
    validation_slots: asyncio.Semaphore | None = None
    line_parsers: Parsers | None = None
    # Projects' limits on interactive requests (api.rate_limits); None counts nothing.
    limiter: RateLimiter | None = None

    async def live_workers(self) -> list[WorkerBeat]:
        """Workers whose heartbeat is fresh; stale entries are dropped on the way."""
        raw = await self.redis.hgetall(WORKERS_KEY)
        live, stale = live_beats(raw, self.settings.worker_ttl_seconds)
        if stale:
            await self.redis.hdel(WORKERS_KEY, *stale)
        return live

    async def failed_checks(self) -> list[FailedCheck]:
        """Workers that refused to serve in the last hour: their engine failed its self-check."""
        recent, old = recent_failed_checks(await self.redis.hgetall(FAILED_CHECKS_KEY))
        if old:
            await self.redis.hdel(FAILED_CHECKS_KEY, *old)
        return recent

    async def has_live_worker(self, model: str) -> bool:
        return any(beat.model == model for beat in await self.live_workers())


_background: set[asyncio.Task] = set()


def in_background(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to its end even if the request that started it is cancelled or answered."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
