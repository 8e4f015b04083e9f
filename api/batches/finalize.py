"""A batch whose jobs have all ended gets its output and error files, and its final status."""

import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api import files
from api.context import ApiContext
from core.tables import Batch, BatchLineError, BatchStatus, Job, JobStatus
from core.wire.batch_files import BatchLineError as LineErrorBody
from core.wire.batch_files import BatchRequestOutput, BatchResponse

log = logging.getLogger(__name__)

# Batches whose jobs run, or whose files are still to be written.
UNFINISHED = (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing)


async def _output_lines(ctx: ApiContext, batch_id: str, errors: bool) -> AsyncIterator[bytes]:
    """The batch's output (or error) file, line by line, in input order."""
    wanted = [JobStatus.succeeded] if not errors else [JobStatus.failed, JobStatus.cancelled]
    async with ctx.sessions() as session:
        job_rows = await session.stream(
            select(
                Job.id, Job.custom_id, Job.line_number, Job.response, Job.error, Job.error_status
            )
            .where(Job.batch_id == batch_id, Job.status.in_(wanted))
            .order_by(Job.line_number)
            .execution_options(yield_per=500)
        )
        line_errors = None
        if errors:
            line_errors = (
                await session.stream(
                    select(BatchLineError)
                    .where(BatchLineError.batch_id == batch_id)
                    .order_by(BatchLineError.line)
                    .execution_options(yield_per=500)
                )
            ).scalars()
        async for row in job_rows:
            yield _job_line(row).line()
        if line_errors is not None:
            async for line_error in line_errors:
                e = line_error.error
                yield BatchRequestOutput(
                    id=f"batch_req_line{line_error.line}",
                    custom_id=line_error.custom_id,
                    response=None,
                    error=LineErrorBody(
                        code=e["code"], message=e["message"], param=e["param"], line=e["line"]
                    ),
                ).line()


def _job_line(row: Any) -> BatchRequestOutput:
    """A job's line: its answer, or its error as an answer; a line that never ran (cancelled,
    expired) has an error instead."""
    record = BatchRequestOutput(
        id=f"batch_req_{row.id.removeprefix('chatcmpl-')}",
        custom_id=row.custom_id,
        response=None,
        error=None,
    )
    if row.response is not None:
        record.response = BatchResponse(status_code=200, request_id=row.id, body=row.response)
        return record
    error = (row.error or {}).get("error", {})
    if error.get("code") in ("batch_cancelled", "batch_expired"):
        record.error = LineErrorBody(code=error["code"], message=error["message"])
    else:
        record.response = BatchResponse(
            status_code=row.error_status or 500, request_id=row.id, body=row.error
        )
    return record


async def finalize(ctx: ApiContext, batch_id: str) -> None:
    """Write the output and error files of a batch whose jobs have all ended.

    The batch's row stays locked while its files are written, so that of several API processes
    one finalizes it; one that fails midway leaves it finalizing, to be taken up again.
    """
    async with ctx.sessions.begin() as session:
        await session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.in_progress)
            .values(status=BatchStatus.finalizing, finalizing_at=func.now())
        )
    async with ctx.sessions.begin() as session:
        batch = await session.scalar(
            select(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(UNFINISHED))
            .with_for_update(skip_locked=True)
        )
        if batch is None:
            return
        output = await files.write_lines(
            session,
            batch.project,
            batch.api_key_id,
            f"{batch_id}_output.jsonl",
            "batch_output",
            _output_lines(ctx, batch_id, errors=False),
            batch.output_expires_after,
        )
        error = await files.write_lines(
            session,
            batch.project,
            batch.api_key_id,
            f"{batch_id}_error.jsonl",
            "batch_output",
            _output_lines(ctx, batch_id, errors=True),
            batch.output_expires_after,
        )
        if batch.status == BatchStatus.cancelling:
            final, stamp = BatchStatus.cancelled, "cancelled_at"
        elif await _expired(session, batch_id):
            final, stamp = BatchStatus.expired, "expired_at"
        else:
            final, stamp = BatchStatus.completed, "completed_at"
        batch.status = final
        batch.output_file_id = output.id if output else None
        batch.error_file_id = error.id if error else None
        setattr(batch, stamp, func.now())
        # The output is written: that is delivery for the batch's `store: false` jobs.
        await session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, ~Job.store)
            .values(request=None, response=None, delivered_at=func.now())
        )


async def _expired(session: AsyncSession, batch_id: str) -> bool:
    return bool(
        await session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.batch_id == batch_id,
                type_coerce(Job.error, JSONB)["error"]["code"].astext == "batch_expired",
            )
        )
    )
