"""The contract between the API and the workers: task names, queues, Redis keys, Celery config.

The API sends tasks by name; it never imports the workers' code.
"""

import json
import time
from dataclasses import asdict, dataclass

from celery import Celery

from core.settings import CoreSettings

CHAT_COMPLETION_TASK = "ferry.chat_completion"
# A chunk of a batch's jobs, by id, run together in the engine at batch priority.
BATCH_TASK = "ferry.chat_completion_batch"
# Workers publish a batch id here when some of its jobs end; the API finalizes done batches.
BATCH_PROGRESS_CHANNEL = "ferry:batches:progress"
# Workers publish a job id here when its job reaches a final state.
JOB_DONE_CHANNEL = "ferry:jobs:done"
# The API publishes a job id here to cancel it; the worker running it aborts it in the engine.
JOB_CANCEL_CHANNEL = "ferry:jobs:cancel"
# A streamed job's chunks: entries {"chunk": JSON} ..., then {"done": "1"} or
# {"error": envelope JSON, "status": HTTP status}. Kept this long after the job ends.
STREAM_TTL_SECONDS = 600
# Hash: worker id -> WorkerBeat JSON. A beat older than the TTL means the worker is gone.
WORKERS_KEY = "ferry:workers"


def queue_for(model: str) -> str:
    """The Celery queue a model's jobs go to; every worker serving the model consumes it."""
    return f"ferry.model.{model}"


def stream_key(job_id: str) -> str:
    """The Redis stream a streamed job's chunks travel through, from the worker to the API."""
    return f"ferry:stream:{job_id}"


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

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> "WorkerBeat":
        return cls(**json.loads(raw))

    def alive(self, ttl: float, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.seen_at <= ttl


def live_beats(raw: dict, ttl: float) -> tuple[list[WorkerBeat], list[str]]:
    """Split a WORKERS_KEY hash into live beats and the ids of stale ones."""
    now = time.time()
    live: list[WorkerBeat] = []
    stale: list[str] = []
    for worker_id, value in raw.items():
        try:
            beat = WorkerBeat.loads(value)
        except (ValueError, TypeError):
            stale.append(worker_id)
            continue
        if beat.alive(ttl, now):
            live.append(beat)
        else:
            stale.append(worker_id)
    return live, stale
