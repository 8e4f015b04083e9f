"""Jobs whose worker is gone go back to the queue, or fail when they cannot be run again.

Used by a worker handing back its own jobs (shutdown timeout, engine death) and by the API's
reconciler for the jobs of workers that vanished, in the same steps: execute `statements` in one
transaction of its own (sync or async) session; keep their rows as `Lost`; send `Lost.to_send`
again (core.queue); then queue `Lost.tell` on a Redis pipeline and execute it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Update,
    and_,
    case,
    func,
    null,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB

from core.bus import (
    BatchProgress,
    JobDone,
    StreamError,
    add_to_stream,
    publish,
)
from core.errors import FerryError
from core.queue import Dispatch
from core.tables import Batch, Job, JobStatus


class WorkerLostError(FerryError):
    status_code = 503
    type = "server_error"
    code = "worker_lost"


def streamed() -> ColumnElement[bool]:
    """Whether a job's request asks for a stream (its chunks may already have reached a client)."""
    return func.coalesce(type_coerce(Job.request, JSONB)["stream"].as_boolean(), False)


def _retryable(max_attempts: int) -> ColumnElement[bool]:
    return and_(~streamed(), Job.attempts < max_attempts)


def running_on(workers: list[str]) -> ColumnElement[bool]:
    """Running jobs of these workers."""
    return and_(Job.status == JobStatus.running, Job.worker.in_(workers))


def requeue(where: ColumnElement[bool], max_attempts: int) -> Update:
    """Put the retryable jobs among `where` back in the queue.

    RETURNING id, model, project, batch_id: the caller sends them to their queues again.
    """
    return (
        update(Job)
        .where(where, _retryable(max_attempts))
        .values(status=JobStatus.queued, worker=None, queued_at=func.now(), dispatched_at=None)
        .returning(Job.id, Job.model, Job.project, Job.batch_id)
    )


def give_up(where: ColumnElement[bool], max_attempts: int, reason: str) -> Select:
    """Fail the jobs among `where` that cannot run again: streamed ones, and those out of attempts.

    One statement, which also counts them as failed in their batches. Its rows are (id, batch_id,
    stream) of the jobs failed: the caller ends streams and wakes waiters.
    """
    attempts_left = Job.attempts < max_attempts
    message = case(
        (
            attempts_left,
            f"{reason} The request was streaming and cannot be resumed; send it again.",
        ),
        else_=f"{reason} The request was tried {max_attempts} times and is not tried again.",
    )
    envelope: Any = func.jsonb_build_object(
        "error",
        func.jsonb_build_object(
            "message",
            message,
            "type",
            WorkerLostError.type,
            "param",
            null(),
            "code",
            case((attempts_left, WorkerLostError.code), else_="max_attempts_exceeded"),
        ),
    )
    failed = (
        update(Job)
        .where(where, ~_retryable(max_attempts))
        .values(
            status=JobStatus.failed,
            finished_at=func.now(),
            error=envelope,
            error_status=case((attempts_left, WorkerLostError.status_code), else_=500),
        )
        .returning(Job.id, Job.batch_id, streamed().label("stream"))
        .cte("failed")
    )
    per_batch = (
        select(failed.c.batch_id, func.count().label("jobs"))
        .where(failed.c.batch_id.is_not(None))
        .group_by(failed.c.batch_id)
        .subquery()
    )
    counted = (
        update(Batch)
        .where(Batch.id == per_batch.c.batch_id)
        .values(failed=Batch.failed + per_batch.c.jobs)
        .returning(Batch.id)
        .cte("counted")
    )
    return select(failed.c.id, failed.c.batch_id, failed.c.stream).add_cte(counted)


def statements(where: ColumnElement[bool], max_attempts: int, reason: str) -> tuple[Select, Update]:
    """`give_up` then `requeue` of the jobs among `where`, to execute in this order in one
    transaction; their rows make a `Lost`."""
    return give_up(where, max_attempts, reason), requeue(where, max_attempts)


@dataclass
class Lost:
    """Jobs handed back: those failed (rows of `give_up`) and those requeued (of `requeue`)."""

    given_up: Sequence[Any]
    requeued: Sequence[Any]
    reason: str

    def to_send(self) -> list[Dispatch]:
        """The requeued jobs, for core.queue to send again."""
        return [Dispatch.of(*row) for row in self.requeued]

    def tell(self, pipe: Any) -> None:
        """Queue on a Redis pipeline (sync or asyncio) what the API and clients are told: a
        streamed job's stream ends with the error, waiters of failed jobs wake, and the batches
        of all these jobs are looked at again."""
        error = WorkerLostError(self.reason)
        for job_id, _batch_id, stream in self.given_up:
            if stream:
                add_to_stream(pipe, job_id, StreamError(error.envelope(), error.status_code))
            publish(pipe, JobDone(job_id))
        requeued = {batch_id for *_, batch_id in self.requeued if batch_id}
        batches = requeued | {b for _, b, _ in self.given_up if b}
        for batch_id in sorted(batches):
            publish(pipe, BatchProgress(batch_id))
