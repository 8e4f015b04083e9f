"""Every Redis stream of a job expires, whoever writes it and whether or not it is ended."""

import asyncio
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis

from core.bus import STREAM_TTL_SECONDS, StreamChunk, StreamDone, add_to_stream, stream_key
from core.ids import new_id
from workers.runtime import Runtime
from workers.streams import write_stream

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('FERRY_TEST_REDIS_DB', '15')}"
# Files that write streams and that this change does not own: each still calls XADD itself, so
# an entry it writes first (a cancel before the job ran, a worker lost before its first chunk)
# makes a stream without a TTL. `strict`: once it goes through add_to_stream, drop its mark.


def _ttl_of(client: redis.Redis, job_id: str) -> int:
    return cast(int, client.ttl(stream_key(job_id)))


@pytest.fixture
def client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def test_the_first_entry_of_a_stream_sets_its_expiry(client: redis.Redis) -> None:
    job_id = new_id("chatcmpl")
    with client.pipeline(transaction=False) as pipe:
        add_to_stream(pipe, job_id, StreamChunk(b"{}"))
        pipe.execute()
    assert 0 < _ttl_of(client, job_id) <= STREAM_TTL_SECONDS
    assert client.xlen(stream_key(job_id)) == 1
    client.delete(stream_key(job_id))


def test_each_entry_sets_it_again(client: redis.Redis) -> None:
    """A stream outliving its TTL while it is written would lose its chunks."""
    job_id = new_id("chatcmpl")
    client.xadd(stream_key(job_id), {"chunk": "{}"})
    client.expire(stream_key(job_id), 5)
    with client.pipeline(transaction=False) as pipe:
        add_to_stream(pipe, job_id, StreamDone())
        pipe.execute()
    assert _ttl_of(client, job_id) > 5
    client.delete(stream_key(job_id))


def test_a_workers_stream_expires_though_it_never_ends(client: redis.Redis) -> None:
    """The worker's writes (chunks, the end, an error) all go through write_stream; a worker that
    dies after its first chunk leaves a stream that expires all the same."""
    job_id = new_id("chatcmpl")

    async def first_chunk() -> None:
        stream_redis = aioredis.Redis.from_url(REDIS_URL)
        try:
            rt = cast(Runtime, SimpleNamespace(stream_redis=stream_redis))
            await write_stream(rt, job_id, StreamChunk(b'{"id": "x"}'))
        finally:
            await stream_redis.aclose()

    asyncio.run(first_chunk())
    assert 0 < _ttl_of(client, job_id) <= STREAM_TTL_SECONDS
    client.delete(stream_key(job_id))


def _stream_writers() -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in ("api", "workers")
        for path in (ROOT / package).rglob("*.py")
    )


@pytest.mark.parametrize("path", _stream_writers())
def test_streams_are_written_only_through_add_to_stream(path: str) -> None:
    """Redis has no XADD that sets a TTL: a bare one can make a stream that lives forever."""
    source = (ROOT / path).read_text()
    assert not re.search(r"\.xadd\(", source), f"{path} calls XADD itself; use add_to_stream"
