"""`store: false` means gone, whatever happens: the content of a job nobody received (an
asynchronous one never polled, a cancelled one, one whose client got 503 or 504, one with an
Idempotency-Key never retried) is purged FERRY_UNSTORED_PURGE_SECONDS after the job ends.

These tests start an API process of their own with a purge delay of a few seconds (the suite's
API keeps the shipped five minutes); its reconciler does the purging.
"""

import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import redis
from sqlalchemy import Engine, text

from bench.stack import Stack, free_port
from core.bus import stream_key
from core.queue import queue_for
from tests.api.test_api_errors import assert_envelope
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

PURGE_SECONDS = 3
URL = "/v1/chat/completions"
HI = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
# An answer of some seconds (no end of text before its max_tokens; about 15 tokens/s here).
OUTLASTS_A_SECOND = {"max_tokens": 80, "logit_bias": {"0": -100, "2": -100}}


@pytest.fixture(scope="module")
def purging(live_worker: Stack, api_key: str) -> Iterator[httpx.Client]:
    """A client of an API process that purges after PURGE_SECONDS and gives a synchronous
    request 1 s before answering 504."""
    port = free_port()
    proc = live_worker.start_api_on(
        port,
        "api-purge",
        FERRY_UNSTORED_PURGE_SECONDS=str(PURGE_SECONDS),
        FERRY_SYNC_TIMEOUT_SECONDS="1",
    )
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(30)


def job(db: Engine, job_id: str) -> Any:
    """The job's row, with `age`: seconds since it ended, by the database's clock."""
    with db.connect() as conn:
        return conn.execute(
            text(
                "SELECT *, extract(epoch FROM now() - finished_at) AS age FROM jobs WHERE id = :id"
            ),
            {"id": job_id},
        ).one()


def ended(db: Engine, job_id: str, seconds: float = 120) -> Any:
    deadline = time.monotonic() + seconds
    while (row := job(db, job_id)).finished_at is None:
        assert time.monotonic() < deadline, f"job {job_id} is still {row.status}"
        time.sleep(0.1)
    return row


def purged(db: Engine, job_id: str) -> Any:
    """The job's row once its content is gone; it must not go before PURGE_SECONDS."""
    deadline = time.monotonic() + PURGE_SECONDS + 30
    while (row := job(db, job_id)).request is not None or row.response is not None:
        assert time.monotonic() < deadline, f"job {job_id} kept its content"
        time.sleep(0.2)
    assert row.age >= PURGE_SECONDS, "purged before the delay"
    # What stays is the accounting.
    assert row.finished_at is not None and row.model and row.project
    return row


def submit_async(client: httpx.Client, body: dict, **headers: str) -> str:
    accepted = client.post(URL, json=body, headers={"Prefer": "respond-async", **headers})
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


def running(db: Engine, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while (status := job(db, job_id).status) != "running":
        assert status == "queued" and time.monotonic() < deadline, status
        time.sleep(0.05)


def test_an_asynchronous_job_nobody_polls(purging: httpx.Client, db: Engine) -> None:
    unstored = submit_async(purging, {"model": MODEL, "messages": HI, "max_tokens": 2})
    stored = submit_async(purging, {"model": MODEL, "messages": HI, "max_tokens": 2, "store": True})
    row = ended(db, unstored)
    assert row.status == "succeeded" and row.response is not None
    row = purged(db, unstored)
    assert row.status == "succeeded" and row.total_tokens and row.delivered_at is None
    assert_envelope(purging.get(f"{URL}/{unstored}"), 404, "completion_id")

    # `store: true` keeps its content until it is deleted.
    assert ended(db, stored).response is not None
    assert purging.get(f"{URL}/{stored}").json()["status"] == "succeeded"


def test_a_cancelled_job(purging: httpx.Client, db: Engine) -> None:
    body = {"model": MODEL, "messages": LONG, "max_tokens": 1000, "temperature": 1.0}
    job_id = submit_async(purging, body)
    running(db, job_id)
    cancelled = purging.post(f"{URL}/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    row = purged(db, job_id)
    assert row.status == "cancelled"
    assert_envelope(purging.get(f"{URL}/{job_id}"), 404, "completion_id")
    assert_envelope(purging.post(f"{URL}/{job_id}/cancel"), 404, "completion_id")


def test_a_synchronous_request_answered_504(purging: httpx.Client, db: Engine) -> None:
    body = {"model": MODEL, "messages": LONG, "temperature": 0, **OUTLASTS_A_SECOND}
    answer = purging.post(URL, json=body)
    error = assert_envelope(answer, 504, code="timeout")
    found = re.search(r"chatcmpl-[\w-]+", error["message"])
    assert found is not None, error["message"]
    # The job runs on after the 504; nobody receives its result.
    row = ended(db, found[0])
    assert row.status == "succeeded" and row.response is not None
    row = purged(db, found[0])
    assert row.delivered_at is None and row.total_tokens


def test_a_synchronous_request_cut_off_by_a_shutdown_with_503(
    live_worker: Stack, api_key: str, purging: httpx.Client, db: Engine
) -> None:
    port = free_port()
    doomed = live_worker.start_api_on(port, "api-purge-doomed", FERRY_SHUTDOWN_TIMEOUT_SECONDS="1")
    sdk = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60
    )
    tag = uuid.uuid4().hex
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            sdk.chat.completions.create,
            model=MODEL,
            messages=LONG,
            temperature=0,
            **OUTLASTS_A_SECOND,
            metadata={"purge": tag},
        )
        deadline = time.monotonic() + 30
        while True:
            with db.connect() as conn:
                job_id = conn.execute(
                    text("SELECT id FROM jobs WHERE metadata->>'purge' = :tag"), {"tag": tag}
                ).scalar()
            if job_id is not None:
                break
            assert time.monotonic() < deadline, "the job was not created"
            time.sleep(0.05)
        running(db, job_id)
        doomed.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIStatusError) as caught:
            answer.result(timeout=30)
    doomed.wait(30)
    assert caught.value.status_code == 503
    row = ended(db, job_id)
    assert row.status == "succeeded"
    row = purged(db, job_id)
    assert row.delivered_at is None


def test_a_streamed_request_answered_503_then_cancelled(
    live_worker: Stack, purging: httpx.Client, db: Engine
) -> None:
    """No worker for the model: 503, the job stays queued; cancelled, it ends unread, its
    stream holding only the cancellation: the stream goes with the content."""
    ghost = f"ghost-purge-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(live_worker.redis_url)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO served_models (name) VALUES (:n)"), {"n": ghost})
    try:
        body = {"model": ghost, "messages": HI, "max_tokens": 2, "stream": True}
        refused = purging.post(URL, json=body)
        error = assert_envelope(refused, 503, code="no_live_worker")
        found = re.search(r"chatcmpl-[\w-]+", error["message"])
        assert found is not None, error["message"]
        job_id = found[0]
        assert job(db, job_id).status == "queued"
        assert purging.post(f"{URL}/{job_id}/cancel").status_code == 200
        assert broker.exists(stream_key(job_id))
        row = purged(db, job_id)
        assert row.status == "cancelled"
        assert not broker.exists(stream_key(job_id))
        assert_envelope(purging.get(f"{URL}/{job_id}"), 404, "completion_id")
    finally:
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE model = :n"), {"n": ghost})
            conn.execute(text("DELETE FROM served_models WHERE name = :n"), {"n": ghost})
        broker.delete(queue_for(ghost))


def test_an_idempotent_job_never_delivered(purging: httpx.Client, db: Engine) -> None:
    key = f"purge-{uuid.uuid4().hex}"
    body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    first = submit_async(purging, body, **{"Idempotency-Key": key})
    # A retry within the delay is the same job.
    assert submit_async(purging, body, **{"Idempotency-Key": key}) == first
    assert ended(db, first).response is not None
    row = purged(db, first)
    assert row.delivered_at is None
    # The key went with the content: a retry now is a new request.
    assert row.idempotency_key is None and row.request_hash is None
    again = submit_async(purging, body, **{"Idempotency-Key": key})
    assert again != first
    assert ended(db, again).status == "succeeded"
