"""A job's life in the database, seen from the worker: claim, then store results."""

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Table, and_, bindparam, case, func, null, or_, update
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
    """Mark the queued jobs among `job_ids` running here, in one statement.

    Only queued jobs are claimed: a message delivered twice, or sent again by the reconciler,
    finds its job running elsewhere or ended and does nothing.
    """
    with sessions.begin() as session:
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.queued)
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


@dataclass
class Outcome:
    """How one job of a chunk ended: a completion, or an error (envelope and status)."""

    job_id: str
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    error_status: int | None = None

    def sent(self) -> dict[str, Any]:
        """The outcome as the job-done notification carries it."""
        if self.response is not None:
            return {"status": "succeeded", "response": self.response}
        return {"status": "failed", "error": self.error, "error_status": self.error_status}


def finish_many(session: Session, outcomes: list[Outcome]) -> int:
    """Store many jobs' results in two statements (sent in one pipeline); how many were stored."""
    succeeded = []
    failed = []
    for o in outcomes:
        if o.response is not None:
            usage = o.response.get("usage") or {}
            succeeded.append(
                {
                    "job_id": o.job_id,
                    "response": o.response,
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                    "total_tokens": usage.get("total_tokens"),
                }
            )
        elif o.error is not None:
            failed.append({"job_id": o.job_id, "error": o.error, "error_status": o.error_status})
    table = cast(Table, Job.__table__)
    purged = and_(
        ~table.c.store, table.c.delivered_at.is_not(None), table.c.idempotency_key.is_(None)
    )
    stored = 0
    for status, params, values in (
        (
            JobStatus.succeeded,
            succeeded,
            {
                "response": case((purged, null()), else_=bindparam("response", type_=JSONB)),
                "prompt_tokens": bindparam("prompt_tokens"),
                "completion_tokens": bindparam("completion_tokens"),
                "total_tokens": bindparam("total_tokens"),
            },
        ),
        (
            JobStatus.failed,
            failed,
            {"error": bindparam("error", type_=JSONB), "error_status": bindparam("error_status")},
        ),
    ):
        if not params:
            continue
        statement = (
            update(table)
            .where(
                table.c.id == bindparam("job_id"),
                # Queued too: a job handed back (its worker taken for lost) whose first run still
                # finished keeps that result and is not run again. (No IN: executemany cannot
                # expand one.)
                or_(table.c.status == JobStatus.queued, table.c.status == JobStatus.running),
            )
            .values(
                status=status,
                finished_at=func.now(),
                request=case((purged, null()), else_=table.c.request),
                **values,
            )
        )
        stored += cast(CursorResult, session.connection().execute(statement, params)).rowcount
    return stored
