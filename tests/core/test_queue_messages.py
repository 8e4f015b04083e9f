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
    batch_queue_for,
    make_celery,
    queue_for,
    send_jobs,
)
from core.settings import CoreSettings

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('FERRY_TEST_REDIS_DB', '15')}"
MODEL = "queue-messages-model"


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queue_for(MODEL), batch_queue_for(MODEL))
    yield client
    client.delete(queue_for(MODEL), batch_queue_for(MODEL))


def test_jobs_go_one_per_message_and_batch_work_in_chunks(broker: redis.Redis) -> None:
    celery = make_celery(CoreSettings(redis_url=REDIS_URL), "test")
    interactive = [f"chatcmpl-i{i}" for i in range(3)]
    batch = [f"chatcmpl-b{i}" for i in range(BATCH_CHUNK * 2 + 5)]
    sent = send_jobs(
        celery,
        [(job_id, MODEL, False) for job_id in interactive]
        + [(job_id, MODEL, True) for job_id in batch],
    )
    assert sent == interactive + batch
    # The worker's Celery consumer reads tasks; its batch puller reads chunks (core.bus).
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        tasks = [channel.basic_get(queue_for(MODEL), no_ack=True) for _ in interactive]
        assert [m.headers["task"] for m in tasks] == [CHAT_COMPLETION_TASK] * 3
        assert [json.loads(m.body)[0] for m in tasks] == [[i] for i in interactive]
        chunks = []
        while (message := channel.basic_get(batch_queue_for(MODEL), no_ack=True)) is not None:
            chunks.append(BatchChunk.decode(message.decode()).job_ids)
    assert [len(c) for c in chunks] == [BATCH_CHUNK, BATCH_CHUNK, 5]
    assert [job_id for chunk in chunks for job_id in chunk] == batch
