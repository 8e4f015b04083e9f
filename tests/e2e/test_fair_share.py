"""Fair share of a model's batch work: a project's small batch, submitted behind another
project's big one, starts at once and does not wait for it (workers.fair_share).

The worker here runs the fake engine (4 requests at once, 0.25 s each: 16 jobs/s): this is about
the order in which the queue hands out work, not about answers.
"""

import json
import subprocess
import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from tests.e2e.test_batches import upload, wait_until

pytestmark = pytest.mark.e2e

MODEL = "fair-share-fake"
BIG, SMALL = 320, 32
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake_worker(live_worker: Stack, db: Engine) -> Iterator[subprocess.Popen]:
    """A worker of MODEL on the fake engine; once stopped, the model is no longer served (the
    stack's readiness asks a live worker of every served model)."""
    proc = live_worker.start_worker(
        "worker-fair",
        "--model",
        MODEL,
        FERRY_ENGINE="fake",
        FERRY_MAX_NUM_SEQS="4",
        FERRY_FAKE_ENGINE_DELAY_SECONDS="0.25",
    )
    live_worker.wait_for_workers(2, timeout=60)
    yield proc
    proc.terminate()
    proc.wait(30)
    with db.begin() as conn:
        conn.execute(text("DELETE FROM served_models WHERE name = :m"), {"m": MODEL})


def team(stack: Stack) -> openai.OpenAI:
    name = f"fair-{uuid.uuid4().hex[:8]}"
    stack.ferry("projects", "create", name)
    key = stack.create_key("fair", project=name)
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def submit(client: openai.OpenAI, count: int, tag: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    rows = [
        json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": URL, "body": body})
        for i in range(count)
    ]
    file_id = upload(client, rows).id
    return client.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h").id


def test_a_small_batch_behind_a_big_one_of_another_project_does_not_wait_for_it(
    live_worker: Stack, fake_worker: subprocess.Popen, db: Engine
) -> None:
    a, b = team(live_worker), team(live_worker)
    big = submit(a, BIG, "a")
    deadline = time.monotonic() + 60
    while a.batches.retrieve(big).request_counts.completed < SMALL:
        assert time.monotonic() < deadline, "the big batch did not start"
        time.sleep(0.2)

    small = submit(b, SMALL, "b")
    done = wait_until(b, small, {"completed", "failed"}, seconds=60)
    assert done.status == "completed" and done.request_counts.completed == SMALL
    # The big batch has most of its lines still to run: the small one went beside it, not after.
    behind = a.batches.retrieve(big)
    assert behind.status == "in_progress"
    assert behind.request_counts.completed < BIG * 3 // 4, behind.request_counts

    # While both had work queued, the worker took their lines in turns: as many of A's lines
    # started during B's run as B's own, within a chunk or two (32 lines each).
    with db.connect() as conn:
        first, last = conn.execute(
            text("SELECT min(started_at), max(started_at) FROM jobs WHERE batch_id = :b"),
            {"b": small},
        ).one()
        beside = conn.scalar(
            text(
                "SELECT count(*) FROM jobs WHERE batch_id = :b"
                " AND started_at BETWEEN :first AND :last"
            ),
            {"b": big, "first": first, "last": last},
        )
    assert abs(beside - SMALL) <= 2 * 32, beside
    assert wait_until(a, big, {"completed", "failed"}).request_counts.completed == BIG
