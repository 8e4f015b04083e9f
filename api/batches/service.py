"""OpenAI's Batch API on a batch's row: create (its lines are read by `ingest`), retrieve, list,
cancel; and stopping a batch's open jobs, for a cancel or the end of its window.
"""

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api import files
from api.batches.lines import ENDPOINT
from api.context import ApiContext
from api.stored import page
from core.errors import ConflictError, InvalidRequestError, NotFoundError, error_envelope
from core.ids import new_id
from core.queue import BATCH_PROGRESS_CHANNEL, JOB_CANCEL_CHANNEL
from core.tables import ApiKey, Batch, BatchStatus, Job, JobStatus
from core.validation import check_metadata, check_range

log = logging.getLogger(__name__)

WINDOWS = {"24h": timedelta(hours=24)}
_TIMES = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


async def create(
    session: AsyncSession,
    key: ApiKey,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> Batch:
    """A new batch, validating; its lines are read by `ingest`."""
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
    batch = Batch(
        id=new_id("batch"),
        project=key.project,
        api_key_id=key.id,
        endpoint=endpoint,
        input_file_id=file.id,
        completion_window=completion_window,
        status=BatchStatus.validating,
        metadata_=metadata,
    )
    session.add(batch)
    await session.commit()
    await session.refresh(batch)
    return batch


async def get(session: AsyncSession, key: ApiKey, batch_id: str) -> Batch:
    batch = await session.get(Batch, batch_id)
    if batch is None or batch.project != key.project:
        raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


async def view(session: AsyncSession, batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object, from its row alone: its jobs are counted there as they end.

    (`session` is not used any more; it stays while other work calls `view` this way.)
    """
    prompt, completion = batch.prompt_tokens, batch.completion_tokens
    body: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at.timestamp()),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed + batch.invalid,
        },
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
        "metadata": batch.metadata_,
    }
    if batch.model is not None:
        body["model"] = batch.model
    for name in _TIMES:
        value = getattr(batch, name)
        if value is not None:
            body[name] = int(value.timestamp())
    # The spec has these as strings when set; absent rather than null when not.
    for name in ("output_file_id", "error_file_id", "errors"):
        if body[name] is None:
            del body[name]
    return body


async def list_batches(
    session: AsyncSession, key: ApiKey, after: str | None, limit: int
) -> dict[str, Any]:
    check_range(limit, 1, 100, "limit")
    query = select(Batch).where(Batch.project == key.project)
    if after is not None:
        anchor = await get(session, key, after)
        query = query.where(
            (Batch.created_at, Batch.id) < (anchor.created_at, anchor.id)  # type: ignore[operator]
        )
    rows = (
        await session.scalars(
            query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
        )
    ).all()
    return page([await view(session, b) for b in rows[:limit]], len(rows) > limit)


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
                pipe.publish(JOB_CANCEL_CHANNEL, job_id)
            await pipe.execute()
    await ctx.redis.publish(BATCH_PROGRESS_CHANNEL, batch_id)
