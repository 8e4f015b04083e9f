"""The limiter's Redis script on real Redis and Postgres, without an API: all three limits checked
at once, nothing counted for a refused request, tokens corrected to the usage, a place released
once however many see the end, and the sweep releasing what no process did."""

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import insert

from api import throttled
from api.cache import TtlCache
from api.rate_limits import RateLimiter, _key
from bench.stack import Stack
from core.db import async_engine, async_sessions
from core.errors import RateLimitError
from core.tables import ApiKey, Project, ProjectLimit
from core.wire.requests import ChatCompletionRequest

DATABASE = os.environ.get("FERRY_TEST_DATABASE", "ferry_test") + "_limiter"
REDIS_DB = int(os.environ.get("FERRY_TEST_REDIS_DB", "15"))
MODEL = "m"
# 2 characters and a message: 5 tokens, and 10 more it may write.
BODY = ChatCompletionRequest.model_validate(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    stack = Stack(database=DATABASE, redis_db=REDIS_DB)
    stack.drop_database()
    stack.ferry("db", "upgrade")
    yield stack.database_url
    stack.drop_database()


@pytest.fixture
def broker() -> str:
    return f"redis://127.0.0.1:6379/{REDIS_DB}"


async def limited(database_url: str, broker: str, **limits: int) -> tuple[RateLimiter, ApiKey]:
    """A limiter on the test data, and a key of a new project with `limits` on MODEL."""
    engine = async_engine(database_url, 2)
    sessions = async_sessions(engine)
    name = f"p-{uuid.uuid4().hex[:8]}"
    async with sessions.begin() as session:
        await session.execute(insert(Project).values(name=name))
        await session.execute(insert(ProjectLimit).values(project=name, **limits))
    redis = aioredis.Redis.from_url(broker)
    key = ApiKey(id="key", name="k", project=name, key_hash="x", key_prefix="x")
    return RateLimiter(redis, sessions, TtlCache(0)), key


async def close(limiter: RateLimiter) -> None:
    await limiter.redis.aclose()
    await limiter.sessions.kw["bind"].dispose()


def test_a_refused_request_counts_against_nothing(database_url: str, broker: str) -> None:
    async def scenario() -> None:
        limiter, key = await limited(database_url, broker, rpm=3, tpm=40)
        first = await limiter.admit(key, BODY, 2048, "job-1")
        assert first["x-ratelimit-remaining-requests"] == "2"
        assert first["x-ratelimit-remaining-tokens"] == "25"
        await limiter.admit(key, BODY, 2048, "job-2")
        # Out of tokens (10 left, 15 asked), not of requests: refused for tokens...
        with pytest.raises(RateLimitError) as caught:
            await limiter.admit(key, BODY, 2048, "job-3")
        assert caught.value.type == "tokens"
        # ... and the request it did not make is still there to be made.
        usage = await limiter.usage(key.project, MODEL, await limiter.limits(key.project, MODEL))
        assert usage.requests is not None and usage.requests.remaining == 1
        assert usage.tokens is not None and 10 <= usage.tokens.remaining < 12
        assert usage.in_flight == 2
        # Counted once among the project's refusals, under the limit that refused it; reading
        # the buckets counts nothing.
        counted = (await throttled.read(limiter.redis)).of(key.project)
        assert counted.total == counted.last_hour == {(key.project, MODEL, "tpm"): 1}
        await close(limiter)

    asyncio.run(scenario())


def test_requests_refill_over_the_minute(database_url: str, broker: str) -> None:
    async def scenario() -> None:
        limiter, key = await limited(database_url, broker, rpm=2)
        await limiter.admit(key, BODY, 2048, "a")
        await limiter.admit(key, BODY, 2048, "b")
        with pytest.raises(RateLimitError) as caught:
            await limiter.admit(key, BODY, 2048, "c")
        assert caught.value.type == "requests"
        assert caught.value.code == "rate_limit_exceeded"
        # One request comes back every 30 s: that is the wait.
        assert 29 <= int(caught.value.headers["Retry-After"]) <= 30
        assert 29_000 <= int(caught.value.headers["retry-after-ms"]) <= 30_000
        # Full again a minute after the first request.
        reset = caught.value.headers["x-ratelimit-reset-requests"]
        assert reset == "1m0s" or reset.startswith("59."), reset
        await close(limiter)

    asyncio.run(scenario())


def test_tokens_are_corrected_to_the_usage_once(database_url: str, broker: str) -> None:
    async def scenario() -> None:
        limiter, key = await limited(database_url, broker, tpm=1000, max_concurrent=1)
        await limiter.admit(key, BODY, 2048, "job")
        with pytest.raises(RateLimitError) as caught:
            await limiter.admit(key, BODY, 2048, "other")
        assert "at once" in caught.value.message
        # It used 7 of its estimated 15; whoever sees the end, it is released once.
        await asyncio.gather(limiter.release("job", used=7), limiter.release("job", used=7))
        released = await limiter._release(
            keys=[_key(key.project, MODEL, "tokens"), _key(key.project, MODEL, "jobs")],
            args=[60_000, "job", 7, 1000],
        )
        assert released == 0
        usage = await limiter.usage(key.project, MODEL, await limiter.limits(key.project, MODEL))
        assert usage.tokens is not None and 993 <= usage.tokens.remaining <= 1000
        assert usage.in_flight == 0
        await limiter.admit(key, BODY, 2048, "other")
        await close(limiter)

    asyncio.run(scenario())


def test_the_sweep_releases_what_no_process_did(database_url: str, broker: str) -> None:
    async def scenario() -> None:
        limiter, key = await limited(database_url, broker, max_concurrent=1)
        await limiter.admit(key, BODY, 2048, "lost-job")
        # Its process died before storing it, over a minute ago.
        jobs = _key(key.project, MODEL, "jobs")
        await limiter.redis.hset(jobs, "lost-job", "15:1000")
        limiter.counted.clear()
        with pytest.raises(RateLimitError):
            await limiter.admit(key, BODY, 2048, "next")
        assert await limiter.sweep() >= 1
        await limiter.admit(key, BODY, 2048, "next")
        # A fresh one is left alone: it may not be committed yet.
        await limiter.sweep()
        assert await limiter.redis.hexists(jobs, "next")
        await close(limiter)

    asyncio.run(scenario())
