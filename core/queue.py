"""The contract between the API and the workers: task names, queues, Celery's configuration, and
how a job is sent to its queue (and recorded as sent, for the reconciler).

The API sends tasks by name; it never imports the workers' code. The messages exchanged through
Redis besides the queues are in core.bus.
"""

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

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
# A batch's jobs go BATCH_CHUNK ids per message (core.bus.BatchChunk) to their model's batch
# queue, which a worker pulls from only while its engine has room for another chunk: a batch
# spreads over every worker serving its model.
BATCH_CHUNK = 32
# Hash: worker id -> WorkerBeat JSON. A beat older than the TTL means the worker is gone.
WORKERS_KEY = "ferry:workers"
# Set by the reconciler, kept by Redis as long as its queues: gone means the broker lost them.
BROKER_MARK_KEY = "ferry:broker:mark"
# Dispatch records written per statement.
_MARK_ROWS = 10_000

# (job id, model, is batch work)
Dispatch = tuple[str, str, bool]


def queue_for(model: str) -> str:
    """The Celery queue a model's jobs go to; every worker serving the model consumes it."""
    return f"ferry.model.{model}"


def batch_queue_for(model: str) -> str:
    """The queue of a model's batch chunks."""
    return f"ferry.batch.{model}"


def send_jobs(celery: Celery, jobs: Iterable[Dispatch]) -> list[str]:
    """Send jobs to their queues over one connection; the ids sent.

    Interactive jobs go one per message (a Celery task); batch jobs BATCH_CHUNK per message.
    """
    chunks: dict[str, list[str]] = {}
    sent: list[str] = []
    with celery.producer_or_acquire() as producer:
        for job_id, model, batch in jobs:
            sent.append(job_id)
            if not batch:
                celery.send_task(
                    CHAT_COMPLETION_TASK, args=[job_id], queue=queue_for(model), producer=producer
                )
                continue
            chunk = chunks.setdefault(model, [])
            chunk.append(job_id)
            if len(chunk) == BATCH_CHUNK:
                _send_chunk(producer, model, chunk)
                chunks[model] = []
        for model, chunk in chunks.items():
            if chunk:
                _send_chunk(producer, model, chunk)
    return sent


def _send_chunk(producer: Any, model: str, ids: list[str]) -> None:
    # The default exchange routes by queue name; the batch puller reads the queue itself.
    producer.publish(
        BatchChunk(ids).encode(), exchange="", routing_key=batch_queue_for(model), serializer="json"
    )


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
