"""A job's life in the database, seen from the worker: claim, succeed, fail."""

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, and_, bindparam, case, func, null, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from core.tables import Job, JobStatus


@dataclass
class ClaimedJob:
    id: str
    model: str
    request: dict[str, Any]
    created: int
    metadata: dict[str, str] | None
    attempts: int
    batch_id: str | None


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> ClaimedJob | None:
    """Mark a job running; None if it has already ended (a redelivered task does nothing)."""
    claimed = claim_many(sessions, [job_id], worker)
    return claimed[0] if claimed else None


def claim_many(
    sessions: sessionmaker[Session], job_ids: list[str], worker: str
) -> list[ClaimedJob]:
    """Mark the jobs that have not ended running, in one statement."""
    with sessions.begin() as session:
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status.in_([JobStatus.queued, JobStatus.running]))
            .values(
                status=JobStatus.running,
                started_at=func.now(),
                attempts=Job.attempts + 1,
                worker=worker,
            )
            .returning(
                Job.id,
                Job.model,
                Job.request,
                Job.created,
                Job.metadata_,
                Job.attempts,
                Job.batch_id,
            )
        ).all()
    return [ClaimedJob(*row) for row in rows]


def succeed(sessions: sessionmaker[Session], job_id: str, response: dict[str, Any]) -> bool:
    """Store the completion; False if the job had already ended (nothing is written twice)."""
    with sessions.begin() as session:
        return succeed_in(session, job_id, response)


def succeed_in(session: Session, job_id: str, response: dict[str, Any]) -> bool:
    """`succeed`, within a transaction of the caller's."""
    usage = response.get("usage") or {}
    return _finish(
        session,
        job_id,
        [JobStatus.running],
        status=JobStatus.succeeded,
        response=response,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
    )


def fail(
    sessions: sessionmaker[Session], job_id: str, status: int, envelope: dict[str, Any]
) -> bool:
    """Store the job's error (OpenAI's envelope) and the HTTP status it answers with."""
    with sessions.begin() as session:
        return fail_in(session, job_id, status, envelope)


def fail_in(session: Session, job_id: str, status: int, envelope: dict[str, Any]) -> bool:
    """`fail`, within a transaction of the caller's."""
    return _finish(
        session,
        job_id,
        [JobStatus.queued, JobStatus.running],
        status=JobStatus.failed,
        error=envelope,
        error_status=status,
    )


def _finish(session: Session, job_id: str, from_: list[JobStatus], **values: Any) -> bool:
    """Move a job from one of `from_` to a final state; False if it was in none of them.

    A `store: false` job whose client has already gone (its stream was cut) keeps no content.
    """
    purged = and_(~Job.store, Job.delivered_at.is_not(None), Job.idempotency_key.is_(None))
    if "response" in values:
        values["response"] = case(
            (purged, null()), else_=bindparam("response", values["response"], type_=JSONB)
        )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(from_))
        .values(
            finished_at=func.now(),
            request=case((purged, null()), else_=Job.request),
            **values,
        )
    )
    return bool(cast(CursorResult, result).rowcount)
