"""The contract between the API and the workers: task names, queues, Redis keys, Celery config.

The API sends tasks by name; it never imports the workers' code.
"""

import base64
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from celery import Celery

from core.settings import CoreSettings

T = TypeVar("T")

CHAT_COMPLETION_TASK = "ferry.chat_completion"
# A chunk of a batch's jobs, by id, run together in the engine at batch priority. Chunks go to
# their own queue, which a worker pulls from only while its engine has room for another chunk:
# a batch spreads over every worker serving its model.
BATCH_TASK = "ferry.chat_completion_batch"
BATCH_CHUNK = 32
# Workers publish a batch id here when some of its jobs end; the API finalizes done batches.
BATCH_PROGRESS_CHANNEL = "ferry:batches:progress"
# Published when a job reaches a final state: its id, or (from a worker that has just stored it)
# {"id", "status", "response" | "error" + "error_status"}, which spares the waiting API a read.
JOB_DONE_CHANNEL = "ferry:jobs:done"
# Published when an API key is revoked or a model (re)announced: API processes drop what they
# cached of keys and models.
LOOKUPS_CHANGED_CHANNEL = "ferry:lookups:changed"
# The API publishes a job id here to cancel it; the worker running it aborts it in the engine.
JOB_CANCEL_CHANNEL = "ferry:jobs:cancel"
# A streamed job's chunks: entries {"chunk": JSON} ..., then {"done": "1"} or
# {"error": envelope JSON, "status": HTTP status}. Kept this long after its last entry (the API
# deletes it once delivered): see add_to_stream.
STREAM_TTL_SECONDS = 600
# Hash: worker id -> WorkerBeat JSON. A beat older than the TTL means the worker is gone.
WORKERS_KEY = "ferry:workers"


def queue_for(model: str) -> str:
    """The Celery queue a model's jobs go to; every worker serving the model consumes it."""
    return f"ferry.model.{model}"


def batch_queue_for(model: str) -> str:
    """The queue of a model's batch chunks."""
    return f"ferry.batch.{model}"


# Kombu's Redis transport: a queue is a list per priority step; messages a consumer holds but
# has not acknowledged sit in a hash (with their delivery time in a sorted set).
_PRIORITY_SUFFIXES = ["", "\x06\x163", "\x06\x166", "\x06\x169"]
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def broker_lists(model: str) -> list[str]:
    """The Redis lists holding a model's pending messages."""
    return [
        name + suffix
        for name in (queue_for(model), batch_queue_for(model))
        for suffix in _PRIORITY_SUFFIXES
    ]


def job_ids_in_message(raw: bytes | str) -> list[str]:
    """The job ids a Celery message (as kombu stores it in Redis) carries; [] if not ours."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacknowledged entry: [message, exchange, key]
            message = message[0]
        task = message.get("headers", {}).get("task")
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return []
    if task == CHAT_COMPLETION_TASK:
        return [args[0]]
    if task == BATCH_TASK:
        return list(args[0])
    return []


def send_jobs(celery: Celery, jobs: Iterable[tuple[str, str, bool]]) -> None:
    """Send (job id, model, is batch work) to their queues over one connection.

    Interactive jobs go one per message; batch jobs BATCH_CHUNK per message.
    """
    chunks: dict[str, list[str]] = {}
    with celery.producer_or_acquire() as producer:
        for job_id, model, batch in jobs:
            if not batch:
                celery.send_task(
                    CHAT_COMPLETION_TASK, args=[job_id], queue=queue_for(model), producer=producer
                )
                continue
            chunk = chunks.setdefault(model, [])
            chunk.append(job_id)
            if len(chunk) == BATCH_CHUNK:
                _send_chunk(celery, producer, model, chunk)
                chunks[model] = []
        for model, chunk in chunks.items():
            if chunk:
                _send_chunk(celery, producer, model, chunk)


def _send_chunk(celery: Celery, producer: Any, model: str, ids: list[str]) -> None:
    celery.send_task(BATCH_TASK, args=[ids], queue=batch_queue_for(model), producer=producer)


# A stored result rides with its job-done notification only up to this size; a larger one is
# read back from Postgres. Pub/sub sends every message whole to every API process, and Redis
# disconnects a subscriber whose output buffer overflows (32 MiB by default).
NOTIFIED_RESULT_MAX_BYTES = 64 << 10


def job_done_message(job_id: str, outcome: dict[str, Any] | None = None) -> str:
    """What a worker publishes on JOB_DONE_CHANNEL: the job's id, with `outcome` (only what was
    stored) if it is small enough."""
    if outcome is None:
        return job_id
    message = json.dumps({"id": job_id, **outcome})
    return message if len(message) <= NOTIFIED_RESULT_MAX_BYTES else job_id


def read_job_done(data: bytes | str) -> tuple[str, dict[str, Any] | None]:
    """(job id, stored outcome or None) from a JOB_DONE_CHANNEL message."""
    text = data.decode() if isinstance(data, bytes) else data
    if not text.startswith("{"):
        return text, None
    outcome = json.loads(text)
    return outcome.pop("id"), outcome


def stream_key(job_id: str) -> str:
    """The Redis stream a streamed job's chunks travel through, from the worker to the API."""
    return f"ferry:stream:{job_id}"


def add_to_stream(pipe: Any, job_id: str, entry: dict[Any, Any]) -> None:
    """Queue an entry of a job's stream on a Redis pipeline (sync or asyncio), with the stream's
    expiry: each write sets it again, so that a stream lives STREAM_TTL_SECONDS past its last
    entry whoever writes it (worker, API, reconciler) and whether or not anyone ends or reads it.
    Every XADD to a job's stream goes through here: Redis has no XADD that sets a TTL."""
    key = stream_key(job_id)
    pipe.xadd(key, entry)
    pipe.expire(key, STREAM_TTL_SECONDS)


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

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> "WorkerBeat":
        return cls(**json.loads(raw))

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
