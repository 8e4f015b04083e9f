"""OpenAI's Batch API on a batch's row: create (its lines are read by `ingest`), retrieve, list,
cancel; and stopping a batch's open jobs, for a cancel or the end of its window.
"""

import logging
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api import files
from api.batches.lines import ENDPOINT
from api.context import ApiContext
from api.pagination import ListQuery, keyset
from core.bus import BatchProgress, JobCancel, publish
from core.errors import ConflictError, InvalidRequestError, NotFoundError, error_envelope
from core.ids import new_id
from core.tables import ApiKey, Batch, BatchStatus, Job, JobStatus, Project
from core.validation import check_metadata
from core.wire.resources import BatchList, BatchObject, ExpiresAfter

log = logging.getLogger(__name__)

WINDOWS = {"24h": timedelta(hours=24)}


async def create(
    session: AsyncSession,
    key: ApiKey,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    output_expires_after: ExpiresAfter | None = None,
) -> Batch:
    """A new batch, validating; its lines are read by `ingest`. Its output and error files
    expire as `output_expires_after` says, or else as its project's `batch_output_ttl_seconds`."""
    if endpoint != ENDPOINT:
        raise InvalidRequestError(
            f"Invalid value: '{endpoint}'. Supported values are: '{ENDPOINT}'.",
            param="endpoint",
            code="invalid_value",
        )
    if completion_window not in WINDOWS:
        raise InvalidRequestError(
            f"Invalid value: '{completion_window}'. Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )
    check_metadata(metadata)
    file = await files.get(session, key, input_file_id)
    if file.purpose != "batch":
        raise InvalidRequestError(
            f"File {file.id} has purpose '{file.purpose}', not 'batch'.", param="input_file_id"
        )
    if output_expires_after is not None:
        keep = output_expires_after.seconds
    else:
        keep = await session.scalar(
            select(Project.batch_output_ttl_seconds).where(Project.name == key.project)
        )
    batch = Batch(
        id=new_id("batch"),
        project=key.project,
        api_key_id=key.id,
        endpoint=endpoint,
        input_file_id=file.id,
        completion_window=completion_window,
        status=BatchStatus.validating,
        metadata_=metadata,
        output_expires_after=keep,
    )
    session.add(batch)
    await session.commit()
    await session.refresh(batch)
    return batch


async def get(session: AsyncSession, key: ApiKey, batch_id: str) -> Batch:
    """The caller's batch; 404 otherwise."""
    batch = await session.get(Batch, batch_id)
    if batch is None or batch.project != key.project:
        raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


async def list_batches(session: AsyncSession, key: ApiKey, page: ListQuery) -> BatchList:
    """A page of the caller's batches, newest first."""
    query = select(Batch).where(Batch.project == key.project)
    batches = await keyset(
        session, query, Batch.created_at, Batch.id, page, lambda after: get(session, key, after)
    )
    return BatchList.of([BatchObject.of(batch) for batch in batches], page.limit)


async def cancel(ctx: ApiContext, session: AsyncSession, key: ApiKey, batch_id: str) -> Batch:
    """Cancelling: queued jobs stop, running ones are aborted, finished ones are kept."""
    batch = await get(session, key, batch_id)
    if batch.status not in (BatchStatus.validating, BatchStatus.in_progress):
        raise ConflictError(
            f"Batch {batch_id} is {batch.status.value}; it cannot be cancelled.", param="batch_id"
        )
    batch.status = BatchStatus.cancelling
    batch.cancelling_at = func.now()
    await session.commit()
    await stop_jobs(ctx, batch_id, "batch_cancelled", "The batch was cancelled.")
    await session.refresh(batch)
    return batch


async def stop_jobs(ctx: ApiContext, batch_id: str, code: str, message: str) -> None:
    error = error_envelope(message, "invalid_request_error", None, code)
    async with ctx.sessions.begin() as session:
        stopped = (
            await session.scalars(
                update(Job)
                .where(
                    Job.batch_id == batch_id, Job.status.in_([JobStatus.queued, JobStatus.running])
                )
                .values(
                    status=JobStatus.cancelled,
                    error=error,
                    error_status=409,
                    finished_at=func.now(),
                )
                .returning(Job.id)
            )
        ).all()
    if stopped:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for job_id in stopped:
                publish(pipe, JobCancel(job_id))
            await pipe.execute()
    await publish(ctx.redis, BatchProgress(batch_id))
