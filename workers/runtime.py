"""What a worker's tasks and threads share: its engine, sessions and Redis clients, the jobs in
its engine, and how it hands its jobs back and exits when the engine dies.
"""

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from core.queue import (
    make_celery,
)
from core.settings import WorkerSettings
from workers import jobs, shaping
from workers.engine import LoopHost

log = logging.getLogger(__name__)

app = make_celery(WorkerSettings(), "ferry-worker")

# What a client reads when the engine fails on its request; the cause goes to the worker's log
# only (engine and database text can name internals and other requests' values).
ENGINE_FAILED = "The engine failed on this request; its worker's log has the cause."


@dataclass
class Runtime:
    """What tasks use; set once by the worker before it consumes."""

    worker_id: str
    model: str
    system_fingerprint: str
    engine: LoopHost
    sessions: sessionmaker[Session]
    redis: redis.Redis
    # Used only on the engine's loop: stream chunks are written from there.
    stream_redis: aioredis.Redis
    max_attempts: int = 3
    # Jobs in the engine now, by id: cancelling one's future aborts it.
    inflight: dict[str, concurrent.futures.Future] = field(default_factory=dict)
    # When a job last left the engine (epoch seconds): the heartbeat's idleness starts no sooner.
    last_ended: float = 0.0
    # Set on SIGTERM: take no more work.
    stopping: threading.Event = field(default_factory=threading.Event)

    def ended(self, job_id: str) -> None:
        """The job has left the engine."""
        self.inflight.pop(job_id, None)
        self.last_ended = time.time()

    def cancel(self, job_id: str) -> bool:
        """Abort a job if it runs here."""
        future = self.inflight.get(job_id)
        return future.cancel() if future is not None else False


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    """The runtime the worker installed before it began to consume."""
    assert _runtime is not None, "the worker has not installed its runtime"
    return _runtime


def answering_for(rt: Runtime, claimed: jobs.ClaimedJob) -> shaping.Answering:
    """How a claimed job's answer is labelled and shaped."""
    return shaping.Answering.for_request(
        claimed.request,
        id=claimed.id,
        model=claimed.model,
        created=claimed.created,
        system_fingerprint=rt.system_fingerprint,
        metadata=claimed.metadata,
        batch_id=claimed.batch_id,
    )
