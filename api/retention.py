"""Retention: what has outlived its project's settings, or its own expiry, is deleted.

- Files past `expires_at` (an upload's `expires_after`, a batch's `output_expires_after`, or
  their project's `file_ttl_seconds` / `batch_output_ttl_seconds`) answer 404 from that instant
  (api.files.live); their bytes are then deleted here and the file is marked deleted.
- Stored completions older than their project's `completions_ttl_seconds` are deleted as
  `DELETE /v1/chat/completions/{id}` deletes one: the content goes, the accounting stays (the
  Usage API still counts them).
- Webhook events 30 days old, whose deliveries have all ended (delivered, or given up 72 hours
  after the event), go with their deliveries and attempts.

The reconciler runs this every sweep. Each statement touches at most a bounded number of rows,
in a transaction of its own, and skips rows another transaction holds: nothing is locked for
long, and a backlog drains over a few sweeps (ROUNDS statements of each kind per sweep).
"""

from dataclasses import dataclass, field

from sqlalchemy import and_, delete, exists, func, literal_column, select, tuple_, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from core.tables import (
    DeliveryStatus,
    FileChunk,
    Job,
    JobStatus,
    Project,
    StoredFile,
    WebhookDelivery,
    WebhookEvent,
)

# File chunks (up to 1 MiB each) deleted per statement, and stored completions per statement.
CHUNKS = 64
COMPLETIONS = 500
# Statements of each kind per sweep.
ROUNDS = 20
# Webhook events (with their deliveries and attempts) are kept this long.
WEBHOOK_EVENTS_DAYS = 30


@dataclass
class Retained:
    """What one sweep deleted."""

    files: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    webhook_events: int = 0


def _expired_file() -> list:
    return [
        StoredFile.expires_at <= func.now(),
        StoredFile.deleted_at.is_(None),
        StoredFile.expires_at.is_not(None),
    ]


async def sweep(sessions: async_sessionmaker) -> Retained:
    done = Retained()
    await _files(sessions, done)
    await _completions(sessions, done)
    await _webhook_events(sessions, done)
    return done


async def _webhook_events(sessions: async_sessionmaker, done: Retained) -> None:
    cutoff = func.now() - literal_column(f"interval '{WEBHOOK_EVENTS_DAYS} days'")
    for _ in range(ROUNDS):
        old = (
            select(WebhookEvent.id)
            .where(
                WebhookEvent.created_at < cutoff,
                ~exists().where(
                    WebhookDelivery.event_id == WebhookEvent.id,
                    WebhookDelivery.status == DeliveryStatus.pending,
                ),
            )
            .limit(COMPLETIONS)
            .with_for_update(skip_locked=True)
        )
        async with sessions.begin() as session:
            gone = (
                await session.scalars(
                    delete(WebhookEvent).where(WebhookEvent.id.in_(old)).returning(WebhookEvent.id)
                )
            ).all()
        done.webhook_events += len(gone)
        if len(gone) < COMPLETIONS:
            return


async def _files(sessions: async_sessionmaker, done: Retained) -> None:
    for _ in range(ROUNDS):
        async with sessions.begin() as session:
            chunks = (
                select(FileChunk.file_id, FileChunk.seq)
                .join(StoredFile, StoredFile.id == FileChunk.file_id)
                .where(*_expired_file())
                .limit(CHUNKS)
                .with_for_update(of=FileChunk, skip_locked=True)
            )
            deleted = await session.execute(
                delete(FileChunk).where(tuple_(FileChunk.file_id, FileChunk.seq).in_(chunks))
            )
            emptied = (
                select(StoredFile.id)
                .where(*_expired_file(), ~exists().where(FileChunk.file_id == StoredFile.id))
                .limit(COMPLETIONS)
                .with_for_update(skip_locked=True)
            )
            gone = (
                await session.scalars(
                    update(StoredFile)
                    .where(StoredFile.id.in_(emptied))
                    .values(deleted_at=func.now())
                    .returning(StoredFile.id)
                )
            ).all()
        done.files += gone
        if deleted.rowcount < CHUNKS and not gone:
            return


async def _completions(sessions: async_sessionmaker, done: Retained) -> None:
    async with sessions() as session:
        kept = (
            await session.execute(
                select(Project.name, Project.completions_ttl_seconds).where(
                    Project.completions_ttl_seconds.is_not(None)
                )
            )
        ).all()
    for project, ttl in kept:
        cutoff = func.now() - literal_column("interval '1 second'") * ttl
        for _ in range(ROUNDS):
            old = (
                select(Job.id)
                .where(
                    Job.project == project,
                    and_(Job.store, Job.deleted_at.is_(None), Job.status == JobStatus.succeeded),
                    Job.created_at < cutoff,
                )
                .order_by(Job.created_at)
                .limit(COMPLETIONS)
                .with_for_update(skip_locked=True)
            )
            async with sessions.begin() as session:
                gone = (
                    await session.scalars(
                        update(Job)
                        .where(Job.id.in_(old))
                        .values(
                            deleted_at=func.now(),
                            request=None,
                            response=None,
                            metadata_=None,
                            idempotency_key=None,
                            request_hash=None,
                        )
                        .returning(Job.id)
                    )
                ).all()
            done.completions += gone
            if len(gone) < COMPLETIONS:
                break
