"""A wrong key is refused from memory for FERRY_LOOKUP_CACHE_SECONDS, as a right one is trusted:
retrying it costs no query, and a key created meanwhile works once that time has passed. On a
database of its own, migrated with Alembic."""

import asyncio
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import event, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from api.auth import BearerAuth
from api.cache import TtlCache
from bench.stack import Stack
from core.db import async_engine, async_sessions
from core.ids import new_id
from core.keys import hash_key, new_key
from core.tables import ApiKey

DATABASE = os.environ.get("FERRY_TEST_DATABASE", "ferry_test") + "_auth"


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    stack = Stack(database=DATABASE)
    stack.drop_database()
    stack.ferry("db", "upgrade")
    yield stack.database_url
    stack.drop_database()


class Api:
    """An app behind BearerAuth whose route names the key it was given; key reads counted."""

    def __init__(self, engine: AsyncEngine, seconds: float) -> None:
        app = FastAPI()
        app.add_middleware(BearerAuth)

        @app.get("/v1/whoami")
        async def whoami(request: Request) -> dict[str, str]:
            return {"key": request.state.api_key.id}

        self.lookups = TtlCache(seconds)
        app.state.ctx = SimpleNamespace(lookups=self.lookups, sessions=async_sessions(engine))
        self.app = app
        self.reads = 0

        def counted(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "FROM api_keys" in statement:
                self.reads += 1

        event.listen(engine.sync_engine, "before_cursor_execute", counted)

    async def status(self, token: str) -> int:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as client:
            answer = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        return answer.status_code


async def _add_key(engine: AsyncEngine, token: str) -> str:
    key_id = new_id("key")
    async with engine.begin() as conn:
        await conn.execute(
            insert(ApiKey).values(
                id=key_id, name="t", project="p", key_hash=hash_key(token), key_prefix=token[:14]
            )
        )
    return key_id


def test_a_wrong_key_costs_one_query_then_a_new_key_works_after_the_cache_time(
    database_url: str,
) -> None:
    async def scenario() -> None:
        engine = async_engine(database_url, pool_size=1)
        try:
            api = Api(engine, seconds=3.0)
            token = new_key()
            assert [await api.status(token) for _ in range(5)] == [401] * 5
            assert api.reads == 1
            created = time.monotonic()
            await _add_key(engine, token)
            # Still the remembered refusal, for at most the cache time ...
            assert await api.status(token) == 401
            assert api.reads == 1
            await asyncio.sleep(max(0.0, created + 3.05 - time.monotonic()))
            # ... then the key works, and is trusted from memory in turn.
            assert [await api.status(token) for _ in range(3)] == [200] * 3
            assert api.reads == 2
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_cleared_lookups_let_a_new_key_in_at_once(database_url: str) -> None:
    """What API processes do on a lookups-changed notice."""

    async def scenario() -> None:
        engine = async_engine(database_url, pool_size=1)
        try:
            api = Api(engine, seconds=60)
            token = new_key()
            assert await api.status(token) == 401
            await _add_key(engine, token)
            api.lookups.clear()
            assert await api.status(token) == 200
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_with_no_cache_time_every_request_reads_its_key(database_url: str) -> None:
    async def scenario() -> None:
        engine = async_engine(database_url, pool_size=1)
        try:
            api = Api(engine, seconds=0)
            token = new_key()
            assert [await api.status(token) for _ in range(3)] == [401] * 3
            key_id = await _add_key(engine, token)
            assert await api.status(token) == 200
            async with engine.begin() as conn:
                await conn.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=ApiKey.created_at)
                )
            assert await api.status(token) == 401
            assert api.reads == 5
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_a_full_cache_drops_its_oldest_entries_only() -> None:
    """A flood of wrong keys pushes out the oldest entries, not every trusted key at once."""
    cache = TtlCache(60, size=3)
    for name in ("a", "b", "c", "d"):
        cache.put(name, name.upper())
    assert [cache.get(name) for name in ("a", "b", "c", "d")] == [None, "B", "C", "D"]
    cache.put("b", "B2")  # put again: the newest now
    cache.put("e", "E")
    assert [cache.get(name) for name in ("b", "c", "d", "e")] == ["B2", None, "D", "E"]
