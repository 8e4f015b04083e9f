"""A job's life in the database, seen from the worker: claim, then store results."""

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Table,
    and_,
    bindparam,
    case,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from core.bus import JobOutcome
from core.tables import Batch, Job, JobStatus


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
                # Claimed before its sender recorded the dispatch: the claim records it.
                dispatched_at=func.coalesce(Job.dispatched_at, func.now()),
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
    # The job's batch, whose counts its end moves.
    batch_id: str | None = None

    def sent(self) -> JobOutcome:
        """The outcome as the job-done notification carries it."""
        if self.response is not None:
            return JobOutcome("succeeded", response=self.response)
        return JobOutcome("failed", error=self.error, error_status=self.error_status)


def finish_many(session: Session, outcomes: list[Outcome]) -> int:
    """Store many jobs' results in two statements (sent in one pipeline); how many were stored.

    The batches of the jobs stored count them in the same transaction.
    """
    ending = _lock_open_batch_jobs(session, outcomes)
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
                    "cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens"
                    ),
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
                "cached_tokens": bindparam("cached_tokens"),
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
    _count_in_batches([o for o in outcomes if o.job_id in ending], session)
    return stored


def _lock_open_batch_jobs(session: Session, outcomes: list[Outcome]) -> set[str]:
    """The batch jobs among `outcomes` that have not ended, locked until the transaction ends: the
    statements that store results then end exactly these, and their batches count exactly these."""
    ids = [o.job_id for o in outcomes if o.batch_id is not None]
    if not ids:
        return set()
    return set(
        session.scalars(
            select(Job.id)
            .where(Job.id.in_(ids), Job.status.in_([JobStatus.queued, JobStatus.running]))
            .order_by(Job.id)
            .with_for_update()
        )
    )


def _count_in_batches(ended: list[Outcome], session: Session) -> None:
    """Add jobs that have just ended to their batches' counts and usage.

    One increment per batch, in batch id order: transactions that count in the same batches
    take their row locks in the same order.
    """
    counts: dict[str, dict[str, Any]] = {}
    for o in ended:
        assert o.batch_id is not None
        batch = counts.setdefault(
            o.batch_id,
            {"batch": o.batch_id, "ok": 0, "not_ok": 0, "prompt": 0, "completion": 0},
        )
        if o.response is not None:
            usage = o.response.get("usage") or {}
            batch["ok"] += 1
            batch["prompt"] += usage.get("prompt_tokens") or 0
            batch["completion"] += usage.get("completion_tokens") or 0
        elif o.error is not None:
            batch["not_ok"] += 1
    if not counts:
        return
    table = cast(Table, Batch.__table__)
    session.connection().execute(
        update(table)
        .where(table.c.id == bindparam("batch"))
        .values(
            completed=table.c.completed + bindparam("ok"),
            failed=table.c.failed + bindparam("not_ok"),
            prompt_tokens=table.c.prompt_tokens + bindparam("prompt"),
            completion_tokens=table.c.completion_tokens + bindparam("completion"),
        ),
        [counts[batch_id] for batch_id in sorted(counts)],
    )
