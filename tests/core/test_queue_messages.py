"""What the API sends to Redis, read back the way the workers read it."""

import json
import os
from collections.abc import Iterator

import pytest
import redis

from core.bus import BatchChunk
from core.queue import (
    BATCH_CHUNK,
    CHAT_COMPLETION_TASK,
    FORGET_IF_EMPTY,
    Dispatch,
    batch_projects_key,
    batch_queue_for,
    make_celery,
    queue_for,
    send_jobs,
)
from core.settings import CoreSettings

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('FERRY_TEST_REDIS_DB', '15')}"
MODEL = "queue-messages-model"
KEYS = [
    queue_for(MODEL),
    batch_queue_for(MODEL, "alpha"),
    batch_queue_for(MODEL, "beta"),
    batch_projects_key(MODEL),
]


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*KEYS)
    yield client
    client.delete(*KEYS)


def test_jobs_go_one_per_message_and_batch_work_in_chunks(broker: redis.Redis) -> None:
    celery = make_celery(CoreSettings(redis_url=REDIS_URL), "test")
    interactive = [f"chatcmpl-i{i}" for i in range(3)]
    batch = [f"chatcmpl-b{i}" for i in range(BATCH_CHUNK * 2 + 5)]
    other = [f"chatcmpl-o{i}" for i in range(3)]
    sent = send_jobs(
        celery,
        [Dispatch(job_id, MODEL) for job_id in interactive]
        + [Dispatch(job_id, MODEL, "alpha") for job_id in batch]
        + [Dispatch(job_id, MODEL, "beta") for job_id in other],
    )
    assert sent == interactive + batch + other
    # Each project's batch work has a queue of its own, and the set of projects names both.
    assert broker.smembers(batch_projects_key(MODEL)) == {b"alpha", b"beta"}
    # The worker's Celery consumer reads tasks; its batch puller reads chunks (core.bus).
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        tasks = [channel.basic_get(queue_for(MODEL), no_ack=True) for _ in interactive]
        assert [m.headers["task"] for m in tasks] == [CHAT_COMPLETION_TASK] * 3
        assert [json.loads(m.body)[0] for m in tasks] == [[i] for i in interactive]
        chunks = []
        queue = batch_queue_for(MODEL, "alpha")
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            chunks.append(BatchChunk.decode(message.decode()).job_ids)
    assert [len(c) for c in chunks] == [BATCH_CHUNK, BATCH_CHUNK, 5]
    assert [job_id for chunk in chunks for job_id in chunk] == batch
    assert broker.llen(batch_queue_for(MODEL, "beta")) == 1


def test_a_project_leaves_the_set_only_once_its_queue_is_empty(broker: redis.Redis) -> None:
    celery = make_celery(CoreSettings(redis_url=REDIS_URL), "test")
    send_jobs(celery, [Dispatch("chatcmpl-x", MODEL, "alpha")])
    forget = broker.register_script(FORGET_IF_EMPTY)
    key, queue = batch_projects_key(MODEL), batch_queue_for(MODEL, "alpha")
    assert forget(keys=[queue, key], args=["alpha"]) == 0
    assert broker.smembers(key) == {b"alpha"}
    broker.delete(queue)
    assert forget(keys=[queue, key], args=["alpha"]) == 1
    assert broker.smembers(key) == set()
    # Sent again: back in the set, after its chunk.
    send_jobs(celery, [Dispatch("chatcmpl-y", MODEL, "alpha")])
    assert broker.smembers(key) == {b"alpha"} and broker.llen(queue) == 1
