"""What the API sends to Redis, read back the way the reconciler reads it."""

from collections.abc import Iterator

import pytest
import redis

from core.queue import (
    BATCH_CHUNK,
    batch_queue_for,
    broker_lists,
    job_ids_in_message,
    make_celery,
    queue_for,
    send_jobs,
)
from core.settings import CoreSettings

REDIS_URL = "redis://127.0.0.1:6379/8"
MODEL = "queue-messages-model"


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*broker_lists(MODEL))
    yield client
    client.delete(*broker_lists(MODEL))


def test_jobs_go_one_per_message_and_batch_work_in_chunks(broker: redis.Redis) -> None:
    celery = make_celery(CoreSettings(redis_url=REDIS_URL), "test")
    interactive = [f"chatcmpl-i{i}" for i in range(3)]
    batch = [f"chatcmpl-b{i}" for i in range(BATCH_CHUNK * 2 + 5)]
    send_jobs(
        celery,
        [(job_id, MODEL, False) for job_id in interactive]
        + [(job_id, MODEL, True) for job_id in batch],
    )
    sync_messages = broker.lrange(queue_for(MODEL), 0, -1)
    batch_messages = broker.lrange(batch_queue_for(MODEL), 0, -1)
    assert [job_ids_in_message(m) for m in reversed(sync_messages)] == [[i] for i in interactive]
    chunks = [job_ids_in_message(m) for m in reversed(batch_messages)]
    assert [len(c) for c in chunks] == [BATCH_CHUNK, BATCH_CHUNK, 5]
    assert [job_id for chunk in chunks for job_id in chunk] == batch
    # A message a consumer holds unacknowledged is kept as [message, exchange, routing key].
    held = b"[" + sync_messages[0] + b', "", "' + queue_for(MODEL).encode() + b'"]'
    assert job_ids_in_message(held) == [interactive[-1]]


def test_what_is_not_a_ferry_message_carries_no_job() -> None:
    assert job_ids_in_message(b"not json") == []
    assert job_ids_in_message(b'{"headers": {"task": "other"}, "body": "W10="}') == []
