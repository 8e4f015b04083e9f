"""The contract between the API and the workers: task names, queues, Celery's configuration, and
how a job is sent to its queue (and recorded as sent, for the reconciler).

The API sends tasks by name; it never imports the workers' code. The messages exchanged through
Redis besides the queues are in core.bus.
"""

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, TypeVar

import anyio
from celery import Celery
from sqlalchemy import String, Update, bindparam, func, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from core.bus import BatchChunk
from core.settings import CoreSettings
from core.tables import Job

T = TypeVar("T")

CHAT_COMPLETION_TASK = "ferry.chat_completion"
# A batch's jobs go BATCH_CHUNK ids per message (core.bus.BatchChunk) to the batch queue of their
# model and project, which a worker pulls from only while its engine has room for another chunk:
# a batch spreads over every worker serving its model, and the projects with batch work queued
# take turns by weight (workers.fair_share).
BATCH_CHUNK = 32
# Hash: worker id -> WorkerBeat JSON. A beat older than the TTL means the worker is gone.
WORKERS_KEY = "ferry:workers"
# Set by the reconciler, kept by Redis as long as its queues: gone means the broker lost them.
BROKER_MARK_KEY = "ferry:broker:mark"
# Dispatch records written per statement.
_MARK_ROWS = 10_000


class Dispatch(NamedTuple):
    """A job to send to its queue."""

    job_id: str
    model: str
    # The project of the batch the job is a line of; None for an interactive job.
    batch_project: str | None = None

    @classmethod
    def of(cls, job_id: str, model: str, project: str, batch_id: str | None) -> "Dispatch":
        """From a job's row: (id, model, project, batch_id)."""
        return cls(job_id, model, project if batch_id is not None else None)


def queue_for(model: str) -> str:
    """The Celery queue a model's interactive jobs go to; every worker serving it consumes it."""
    return f"ferry.model.{model}"


def batch_queue_for(model: str, project: str) -> str:
    """The queue of a project's batch chunks for a model."""
    return f"ferry.batch.{model}|{project}"


def batch_projects_key(model: str) -> str:
    """Set: the projects whose batch queue for `model` may hold chunks. A sender adds the project
    after each chunk it sends; a puller that finds the queue empty takes it out (FORGET_IF_EMPTY),
    so a project is never out of the set while its queue holds a chunk."""
    return f"ferry:batch-projects:{model}"


# KEYS: the project's batch queue, batch_projects_key; ARGV: the project.
FORGET_IF_EMPTY = """
if redis.call('LLEN', KEYS[1]) == 0 then
    return redis.call('SREM', KEYS[2], ARGV[1])
end
return 0
"""


def send_jobs(celery: Celery, jobs: Iterable[Dispatch]) -> list[str]:
    """Send jobs to their queues over one connection; the ids sent.

    Interactive jobs go one per message (a Celery task); batch jobs BATCH_CHUNK per message.
    """
    chunks: dict[tuple[str, str], list[str]] = {}
    sent: list[str] = []
    with celery.producer_or_acquire() as producer:
        for job_id, model, project in jobs:
            sent.append(job_id)
            if project is None:
                celery.send_task(
                    CHAT_COMPLETION_TASK, args=[job_id], queue=queue_for(model), producer=producer
                )
                continue
            chunk = chunks.setdefault((model, project), [])
            chunk.append(job_id)
            if len(chunk) == BATCH_CHUNK:
                _send_chunk(producer, model, project, chunk)
                chunks[model, project] = []
        for (model, project), chunk in chunks.items():
            if chunk:
                _send_chunk(producer, model, project, chunk)
    return sent


def _send_chunk(producer: Any, model: str, project: str, ids: list[str]) -> None:
    # The default exchange routes by queue name; the batch puller reads the queue itself.
    producer.publish(
        BatchChunk(ids).encode(),
        exchange="",
        routing_key=batch_queue_for(model, project),
        serializer="json",
    )
    # After the chunk: a puller that finds the queue empty may take the project out before.
    with producer.channel.conn_or_acquire() as client:
        client.sadd(batch_projects_key(model), project)


def mark_dispatched(ids: Sequence[str]) -> Update:
    """Record that these jobs' messages are in the broker (the reconciler resends those without).

    A job claimed before this runs was stamped by its claim, and keeps that time.
    """
    return (
        update(Job)
        .where(
            Job.id == func.any(bindparam("ids", list(ids), type_=ARRAY(String))),
            Job.dispatched_at.is_(None),
        )
        .values(dispatched_at=func.now())
    )


def _marks(ids: list[str]) -> list[Update]:
    return [mark_dispatched(ids[i : i + _MARK_ROWS]) for i in range(0, len(ids), _MARK_ROWS)]


def dispatch(celery: Celery, sessions: sessionmaker[Session], jobs: Iterable[Dispatch]) -> None:
    """Send jobs to their queues, then record them as sent (the worker's way: sync)."""
    for statement in _marks(send_jobs(celery, jobs)):
        with sessions.begin() as session:
            session.execute(statement)


async def dispatch_async(
    celery: Celery, sessions: async_sessionmaker, jobs: Iterable[Dispatch]
) -> None:
    """Send jobs to their queues, then record them as sent (the API's way: Celery in a thread)."""
    sent = await anyio.to_thread.run_sync(send_jobs, celery, list(jobs))
    for statement in _marks(sent):
        async with sessions.begin() as session:
            await session.execute(statement)


def make_celery(settings: CoreSettings, name: str = "ferry") -> Celery:
    """A Celery app on Redis configured for at-least-once delivery of long jobs."""
    app = Celery(name, broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in Postgres
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        worker_hijack_root_logger=False,
        # Print and tracebacks go to the process's own streams, not one log record per write.
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_default_queue="ferry.default",
    )
    return app


@dataclass
class WorkerBeat:
    """What a worker says of itself in each heartbeat."""

    worker_id: str
    model: str
    hostname: str
    pid: int
    started_at: float
    seen_at: float
    # The engine's known-answer check, in one line (workers.self_check).
    self_check: str = ""
    # Since when (epoch seconds) the worker has had no job in its engine while it takes work;
    # None while it has one, or has stopped taking work. A worker idle that long has taken
    # every message its queues held from before then (api.reconciler).
    idle_since: float | None = None

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> "WorkerBeat":
        """A beat, from this release or another (fields it does not know are left out)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def alive(self, ttl: float, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.seen_at <= ttl


# Hash: worker id -> FailedCheck JSON: workers whose engine failed its known-answer check and
# exited without serving. Readers show those younger than FAILED_CHECK_TTL_SECONDS, drop the rest.
FAILED_CHECKS_KEY = "ferry:failed-checks"
FAILED_CHECK_TTL_SECONDS = 3600


@dataclass
class FailedCheck:
    """A worker that refused to serve because its engine answered wrong."""

    worker_id: str
    model: str
    hostname: str
    at: float

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> "FailedCheck":
        return cls(**json.loads(raw))


def _split(
    raw: dict, loads: Callable[[Any], T], keep: Callable[[T], bool]
) -> tuple[list[T], list[Any]]:
    """A Redis hash's values that load and are kept, and the fields of the rest."""
    kept: list[T] = []
    dropped: list[Any] = []
    for field_name, value in raw.items():
        try:
            item = loads(value)
        except (ValueError, TypeError):
            dropped.append(field_name)
            continue
        if keep(item):
            kept.append(item)
        else:
            dropped.append(field_name)
    return kept, dropped


def recent_failed_checks(raw: dict) -> tuple[list[FailedCheck], list[str]]:
    """Split a FAILED_CHECKS_KEY hash into recent failures and the ids of old or bad fields."""
    now = time.time()
    return _split(raw, FailedCheck.loads, lambda f: now - f.at <= FAILED_CHECK_TTL_SECONDS)


def live_beats(raw: dict, ttl: float) -> tuple[list[WorkerBeat], list[str]]:
    """Split a WORKERS_KEY hash into live beats and the ids of stale ones."""
    now = time.time()
    return _split(raw, WorkerBeat.loads, lambda beat: beat.alive(ttl, now))
