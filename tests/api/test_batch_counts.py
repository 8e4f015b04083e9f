"""A batch's counts live on its row, moved in the transaction that ends its jobs, so that showing
or listing batches reads no jobs. On a database of its own, migrated with Alembic."""

import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from bench.stack import Stack
from core import handback
from core.db import sync_engine, sync_sessions
from core.ids import new_id
from core.tables import ApiKey, Batch, BatchStatus, Job, JobStatus, StoredFile
from workers.jobs import Outcome, finish_many

DATABASE = os.environ.get("FERRY_TEST_DATABASE", "ferry_test") + "_counts"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(database=DATABASE)
    stack.drop_database()
    yield stack
    stack.drop_database()


@pytest.fixture(scope="module")
def sessions(stack: Stack) -> Iterator[sessionmaker[Session]]:
    stack.ferry("db", "upgrade")
    engine = sync_engine(stack.database_url, pool_size=8)
    yield sync_sessions(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def owner(sessions: sessionmaker[Session]) -> tuple[str, str]:
    """An API key and an input file for the batches."""
    key_id, file_id = new_id("key"), new_id("file")
    with sessions.begin() as session:
        session.add(
            ApiKey(id=key_id, name="t", project="p", key_hash=new_id("h"), key_prefix="sk-")
        )
        session.flush()
        session.add(
            StoredFile(
                id=file_id,
                project="p",
                api_key_id=key_id,
                filename="in.jsonl",
                purpose="batch",
                bytes=0,
            )
        )
    return key_id, file_id


def new_batch(
    sessions: sessionmaker[Session], owner: tuple[str, str], jobs: int, **job: Any
) -> tuple[str, list[str]]:
    """A batch in progress with `jobs` running jobs (or as `job` says); its id and theirs."""
    key_id, file_id = owner
    batch_id = new_id("batch")
    ids = [new_id("chatcmpl") for _ in range(jobs)]
    with sessions.begin() as session:
        session.add(
            Batch(
                id=batch_id,
                project="p",
                api_key_id=key_id,
                endpoint="/v1/chat/completions",
                input_file_id=file_id,
                completion_window="24h",
                status=BatchStatus.in_progress,
                total=jobs,
            )
        )
        session.flush()
        for line, job_id in enumerate(ids, 1):
            values = {
                "status": JobStatus.running,
                "worker": "w1",
                "attempts": 1,
                "request": {"model": "m", "messages": []},
                **job,
            }
            session.add(
                Job(
                    id=job_id,
                    project="p",
                    api_key_id=key_id,
                    model="m",
                    created=int(time.time()),
                    batch_id=batch_id,
                    custom_id=f"c{line}",
                    line_number=line,
                    store=False,
                    **values,
                )
            )
    return batch_id, ids


def succeeded(job_id: str, batch_id: str, prompt: int = 10, completion: int = 5) -> Outcome:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return Outcome(job_id, {"object": "chat.completion", "usage": usage}, batch_id=batch_id)


def failed(job_id: str, batch_id: str) -> Outcome:
    return Outcome(job_id, None, {"error": {"message": "no"}}, 400, batch_id)


def counts(sessions: sessionmaker[Session], batch_id: str) -> tuple[int, int, int, int]:
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch.completed, batch.failed, batch.prompt_tokens, batch.completion_tokens


def counted_from_jobs(sessions: sessionmaker[Session], batch_id: str) -> tuple[int, int, int, int]:
    """What the API used to count on each view, from the jobs themselves."""
    with sessions() as session:
        row = session.execute(
            text(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
                " count(*) FILTER (WHERE status = 'failed'),"
                " coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)"
                " FROM jobs WHERE batch_id = :b"
            ),
            {"b": batch_id},
        ).one()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def test_stored_results_are_counted_once(sessions: sessionmaker[Session], owner) -> None:
    batch_id, ids = new_batch(sessions, owner, 5)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == ids[4]).values(status=JobStatus.cancelled))
    outcomes = [
        succeeded(ids[0], batch_id, 10, 5),
        succeeded(ids[1], batch_id, 7, 3),
        failed(ids[2], batch_id),
        succeeded(ids[4], batch_id),  # cancelled meanwhile: its result is not stored
    ]
    with sessions.begin() as session:
        assert finish_many(session, outcomes) == 3
    assert counts(sessions, batch_id) == (2, 1, 17, 8) == counted_from_jobs(sessions, batch_id)
    # A task delivered twice stores nothing the second time, and counts nothing.
    with sessions.begin() as session:
        assert finish_many(session, outcomes) == 0
    assert counts(sessions, batch_id) == (2, 1, 17, 8)


def test_a_transaction_that_fails_counts_nothing(sessions: sessionmaker[Session], owner) -> None:
    batch_id, ids = new_batch(sessions, owner, 2)
    with pytest.raises(RuntimeError), sessions.begin() as session:
        finish_many(session, [succeeded(ids[0], batch_id)])
        raise RuntimeError("the connection broke before the commit")
    assert counts(sessions, batch_id) == (0, 0, 0, 0)
    with sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == ids[0])) == JobStatus.running


def test_counts_hold_under_concurrent_finishers(sessions: sessionmaker[Session], owner) -> None:
    """Workers storing results at once, some of the same jobs (a job handed back whose first run
    still ended), across two batches: every job counted exactly once, and no deadlock."""
    batches = [new_batch(sessions, owner, 120) for _ in range(2)]
    outcomes = [
        succeeded(job_id, batch_id, prompt=n % 7, completion=n % 3)
        if n % 5
        else failed(job_id, batch_id)
        for batch_id, ids in batches
        for n, job_id in enumerate(ids)
    ]
    errors: list[BaseException] = []

    def finisher(seed: int) -> None:
        mine = random.Random(seed).sample(outcomes, len(outcomes) // 2)
        try:
            for start in range(0, len(mine), 16):
                with sessions.begin() as session:
                    finish_many(session, mine[start : start + 16])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finisher, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    with sessions.begin() as session:
        finish_many(session, outcomes)  # whatever no thread took
    for batch_id, _ in batches:
        expected = counted_from_jobs(sessions, batch_id)
        assert expected[0] + expected[1] == 120
        assert counts(sessions, batch_id) == expected


def test_jobs_given_up_are_counted_failed(sessions: sessionmaker[Session], owner) -> None:
    """A lost worker's jobs that cannot run again fail in the same statement that counts them."""
    batch_id, out_of_attempts = new_batch(sessions, owner, 3, worker="lost", attempts=3)
    _, retried = new_batch(sessions, owner, 1, worker="lost", attempts=1)
    with sessions.begin() as session:
        given_up = session.execute(
            handback.give_up(handback.running_on(["lost"]), 3, "The worker was lost.")
        ).all()
        requeued = session.execute(handback.requeue(handback.running_on(["lost"]), 3)).all()
    assert sorted(given_up) == sorted((job_id, batch_id, False) for job_id in out_of_attempts)
    assert [row[0] for row in requeued] == retried
    assert counts(sessions, batch_id) == (0, 3, 0, 0) == counted_from_jobs(sessions, batch_id)


def test_the_migration_counts_the_batches_that_exist(stack: Stack) -> None:
    """Batches made before revision 0008 get their counts from their jobs."""
    mine = Stack(database=DATABASE + "_mig")
    mine.drop_database()
    try:
        mine.ferry("db", "upgrade", "0007")
        engine = sync_engine(mine.database_url, pool_size=1)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, project, key_hash, key_prefix)"
                    " VALUES ('k', 'k', 'p', 'h', 'sk-');"
                    " INSERT INTO files (id, project, api_key_id, filename, purpose, bytes)"
                    " VALUES ('f', 'p', 'k', 'in.jsonl', 'batch', 0);"
                    " INSERT INTO batches (id, project, api_key_id, endpoint, input_file_id,"
                    " completion_window, status, total, invalid)"
                    " VALUES ('b1', 'p', 'k', '/v1/chat/completions', 'f', '24h', 'in_progress',"
                    " 4, 0), ('b2', 'p', 'k', '/v1/chat/completions', 'f', '24h', 'in_progress',"
                    " 1, 1)"
                )
            )
            for n, (status, prompt) in enumerate(
                [("succeeded", 4), ("succeeded", 6), ("failed", None), ("running", None)]
            ):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
                        " created, batch_id, prompt_tokens, completion_tokens)"
                        " VALUES (:id, 'p', 'k', 'm', :status, false, 1, 0, 'b1', :p, :p)"
                    ),
                    {"id": f"j{n}", "status": status, "p": prompt},
                )
        mine.ferry("db", "upgrade")
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, completed, failed, prompt_tokens, completion_tokens FROM batches"
                    " ORDER BY id"
                )
            ).all()
        engine.dispose()
        assert [tuple(row) for row in rows] == [("b1", 2, 1, 10, 10), ("b2", 0, 0, 0, 0)]
    finally:
        mine.drop_database()
