"""OpenAI's Batch API: validate a JSONL file line by line, run its lines as jobs, write the
output and error files.

A bad line fails alone (it goes to the error file with its line number); every other line runs.
Lines are parsed in other processes (api.parsing), never on the event loop, and become jobs in
multi-row inserts, one short transaction per run of lines; they reach workers in chunks, as
low-priority work that interactive requests overtake in the engine. One loop per API process
finalizes batches whose jobs have all ended, and expires those past their window; a row lock
elects one process.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
from sqlalchemy import Text, bindparam, cast, delete, func, insert, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api import files
from api.batch_lines import ENDPOINT, Line, Served, read_lines
from api.context import ApiContext
from api.parsing import Parsers
from api.stored import page
from core.errors import ConflictError, InvalidRequestError, NotFoundError, error_envelope
from core.ids import new_id
from core.queue import BATCH_PROGRESS_CHANNEL, JOB_CANCEL_CHANNEL, send_jobs
from core.tables import ApiKey, Batch, BatchLineError, BatchStatus, Job, JobStatus, ServedModel
from core.validation import check_metadata, check_range

log = logging.getLogger(__name__)

WINDOWS = {"24h": timedelta(hours=24)}
# Lines parsed in one go (in another process) and stored in one short transaction: at most this
# many, and no more bytes than READ_BYTES but for the last line.
INSERT_ROWS = 250
READ_BYTES = 1 << 20
# Batches whose jobs run, or whose files are still to be written.
UNFINISHED = (BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing)
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


async def ingest(ctx: ApiContext, batch_id: str) -> None:
    """Read the batch's input file: valid lines become jobs, invalid ones line errors.

    At most FERRY_BATCH_VALIDATION_CONCURRENCY batches validate at once per API process; the
    others wait their turn. One API process at a time validates a batch: it holds a Postgres
    advisory lock on it for as long as it reads, which its death releases. A batch left
    validating (its API process died or stopped midway) is validated again from the start by
    the reconciler: what the first attempt wrote is removed first, and nothing of it was sent to
    workers yet.
    """
    if batch_id in ctx.validating:
        return  # already validating here, or waiting for its turn
    ctx.validating.add(batch_id)
    try:
        if ctx.validation_slots is None:
            ctx.validation_slots = asyncio.Semaphore(ctx.settings.batch_validation_concurrency)
        async with ctx.validation_slots, _batch_lock(ctx, batch_id) as locked:
            if not locked:
                return  # another process is validating it
            try:
                await _ingest(ctx, batch_id)
            except Exception:
                log.exception("batch %s: validation failed", batch_id, extra={"batch_id": batch_id})
                await _fail(ctx, batch_id, "internal_error", "The batch could not be validated.")
    finally:
        ctx.validating.discard(batch_id)


@contextlib.asynccontextmanager
async def _batch_lock(ctx: ApiContext, batch_id: str) -> AsyncIterator[bool]:
    """The batch's advisory lock, if no one else holds it, for the block's length.

    The lock belongs to a connection, which is held throughout: one taken out of the pool, so
    that a long validation holds none of the connections requests need.
    """
    key = func.hashtext("ferry-batch:" + batch_id)
    async with ctx.engine.connect() as lock:
        # Out of the pool at once (its place there is free again), and closed at the end.
        (await lock.get_raw_connection()).detach()
        locked = bool(await lock.scalar(select(func.pg_try_advisory_lock(key))))
        await lock.commit()  # the lock is the connection's, not the transaction's
        try:
            yield locked
        finally:
            if locked:
                await lock.scalar(select(func.pg_advisory_unlock(key)))
                await lock.commit()


async def _ingest(ctx: ApiContext, batch_id: str) -> None:
    async with ctx.sessions.begin() as session:
        batch = await session.get(Batch, batch_id)
        assert batch is not None
        if batch.status != BatchStatus.validating:
            return  # validated already (by an attempt that ended as this one began), or cancelled
        # What an interrupted attempt wrote; none of its jobs has been sent.
        await session.execute(delete(Job).where(Job.batch_id == batch_id))
        await session.execute(delete(BatchLineError).where(BatchLineError.batch_id == batch_id))
        models = {
            m.name: Served(m.capabilities, m.max_model_len)
            for m in await session.scalars(select(ServedModel))
        }
    lines = _Lines(batch, ctx.settings.batch_max_lines)
    if ctx.line_parsers is None:
        ctx.line_parsers = Parsers(ctx.settings.batch_validation_concurrency)
    parsers = ctx.line_parsers
    read = partial(read_lines, models=models, settings=ctx.settings)
    # One run is parsed while the one before it is stored.
    parsing: asyncio.Future[list[Line | None]] | None = None
    try:
        async with contextlib.aclosing(_runs(ctx, batch.input_file_id)) as runs:
            async for run in runs:
                parsed, parsing = parsing, asyncio.ensure_future(parsers.run(read, run))
                if parsed is not None and not await _store(ctx, lines, await parsed):
                    return
        parsed, parsing = parsing, None
        if parsed is not None and not await _store(ctx, lines, await parsed):
            return
    finally:
        if parsing is not None:
            parsing.cancel()

    if lines.jobs == 0:
        first_errors = await _first_line_errors(ctx, batch_id)
        counts = {"lines": lines.lines, "invalid": lines.invalid}
        await _fail(
            ctx, batch_id, "no_valid_lines", "The file has no valid line.", first_errors, counts
        )
        return
    window = WINDOWS[batch.completion_window]
    async with ctx.sessions.begin() as session:
        started = await session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.validating)
            .values(
                status=BatchStatus.in_progress,
                in_progress_at=func.now(),
                expires_at=Batch.created_at + window,
                total=lines.lines,
                invalid=lines.invalid,
                model=next(iter(lines.by_model)) if len(lines.by_model) == 1 else None,
            )
        )
    if started.rowcount:
        await _dispatch(ctx, lines.by_model)
    else:
        await _cancelled_while_validating(ctx, batch_id, lines.lines, lines.invalid)


async def _runs(ctx: ApiContext, file_id: str) -> AsyncGenerator[list[bytes], None]:
    """The file's lines, INSERT_ROWS at a time (or fewer, up to READ_BYTES)."""
    run: list[bytes] = []
    size = 0
    async for raw in files.lines(ctx.sessions, file_id, ctx.settings.max_batch_line_bytes):
        run.append(raw)
        size += len(raw)
        if len(run) >= INSERT_ROWS or size >= READ_BYTES:
            yield run
            run, size = [], 0
    if run:
        yield run


# A job's request arrives as JSON text from the parsing process, and goes in as it is.
_INSERT_JOBS = insert(Job.metadata.tables[Job.__tablename__]).values(
    request=cast(bindparam("request_json", type_=Text), JSONB)
)


async def _store(ctx: ApiContext, lines: "_Lines", read: list[Line | None]) -> bool:
    """Store a parsed run's jobs and line errors in one short transaction; False once the batch
    has stopped validating (cancelled, or failed)."""
    before = lines.lines, lines.invalid
    jobs, errors, too_many = lines.take(read)
    batch_id = lines.batch_id
    async with ctx.sessions.begin() as session:
        # Shared with the row lock a cancel takes: a cancel commits before these jobs exist (and
        # none is written), or after they do (and stops them with the others).
        status = await session.scalar(
            select(Batch.status).where(Batch.id == batch_id).with_for_update(read=True)
        )
        validating = status == BatchStatus.validating
        if validating and not too_many:
            if jobs:
                await session.execute(_INSERT_JOBS, jobs)
            if errors:
                await session.execute(insert(BatchLineError), errors)
    if not validating:
        await _cancelled_while_validating(ctx, batch_id, *before)
        return False
    if too_many:
        limit = ctx.settings.batch_max_lines
        await _fail(ctx, batch_id, "too_many_requests", f"A batch holds at most {limit} lines.")
        return False
    return True


async def _cancelled_while_validating(
    ctx: ApiContext, batch_id: str, lines: int, invalid: int
) -> None:
    """Count what was read before the cancel; its jobs were stopped by it, none was sent."""
    log.info("batch %s: cancelled while it validated", batch_id, extra={"batch_id": batch_id})
    async with ctx.sessions.begin() as session:
        await session.execute(
            update(Batch).where(Batch.id == batch_id).values(total=lines, invalid=invalid)
        )


class _Lines:
    """What needs a batch's lines in order: their numbers, and custom_ids seen before."""

    def __init__(self, batch: Batch, most: int):
        self.batch_id, self.project, self.api_key_id = batch.id, batch.project, batch.api_key_id
        self.most = most
        self.created = int(time.time())
        self.seen: set[str] = set()
        self.by_model: dict[str, list[str]] = {}
        self.lines = self.jobs = self.invalid = 0

    def take(
        self, read: list[Line | None]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
        """Rows for the jobs and the line errors of a parsed run, and whether the file has more
        lines than a batch may."""
        jobs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in read:
            if line is None:
                continue  # a blank line
            self.lines += 1
            number = self.lines
            if number > self.most:
                return jobs, errors, True
            error, custom_id = line.error, line.custom_id
            if custom_id is not None:
                if custom_id in self.seen:
                    error = {
                        "status": 400,
                        "code": "duplicate_custom_id",
                        "message": f"The custom_id '{custom_id}' is used by an earlier line.",
                        "param": "custom_id",
                    }
                self.seen.add(custom_id)
            if error is not None:
                self.invalid += 1
                errors.append(
                    {
                        "batch_id": self.batch_id,
                        "line": number,
                        "custom_id": custom_id if custom_id is not None else line.error_custom_id,
                        "error": {
                            **error,
                            "message": f"Line {number}: {error['message']}",
                            "line": number,
                        },
                    }
                )
                continue
            assert line.job is not None
            job_id = new_id("chatcmpl")
            jobs.append(
                {
                    "id": job_id,
                    "project": self.project,
                    "api_key_id": self.api_key_id,
                    "model": line.job["model"],
                    "status": JobStatus.queued,
                    "request_json": line.job["request"],
                    "store": line.job["store"],
                    "metadata": line.job["metadata"],
                    "attempts": 0,
                    "created": self.created,
                    "batch_id": self.batch_id,
                    "custom_id": custom_id,
                    "line_number": number,
                }
            )
            self.by_model.setdefault(line.job["model"], []).append(job_id)
            self.jobs += 1
        return jobs, errors, False


async def _dispatch(ctx: ApiContext, by_model: dict[str, list[str]]) -> None:
    """Send the jobs to their models' batch queues, BATCH_CHUNK ids per message.

    Should this fail (or the process die first), the reconciler sends them.
    """
    jobs = [(job_id, model, True) for model, ids in by_model.items() for job_id in ids]
    try:
        await anyio.to_thread.run_sync(partial(send_jobs, ctx.celery, jobs))
    except Exception as exc:
        log.warning("could not enqueue batch jobs (%s); the reconciler will send them", exc)


async def _first_line_errors(ctx: ApiContext, batch_id: str) -> list[dict[str, Any]]:
    async with ctx.sessions() as session:
        rows = await session.scalars(
            select(BatchLineError.error)
            .where(BatchLineError.batch_id == batch_id)
            .order_by(BatchLineError.line)
            .limit(1000)
        )
        return [{k: e[k] for k in ("code", "message", "param", "line")} for e in rows.all()]


async def _fail(
    ctx: ApiContext,
    batch_id: str,
    code: str,
    message: str,
    data: list[dict[str, Any]] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
    """Fail a batch still validating (one cancelled meanwhile stays cancelled)."""
    errors = {
        "object": "list",
        "data": data or [{"code": code, "message": message, "param": None, "line": None}],
    }
    values: dict[str, Any] = {
        "status": BatchStatus.failed,
        "failed_at": func.now(),
        "errors": errors,
    }
    if counts is not None:
        values.update(total=counts["lines"], invalid=counts["invalid"])
    async with ctx.sessions.begin() as session:
        failed = await session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.validating)
            .values(**values)
        )
        if failed.rowcount:
            # Jobs of lines read before it failed: none was sent, and none will be.
            await session.execute(delete(Job).where(Job.batch_id == batch_id))


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
    await _stop_jobs(ctx, batch_id, "batch_cancelled", "The batch was cancelled.")
    await session.refresh(batch)
    return batch


async def _stop_jobs(ctx: ApiContext, batch_id: str, code: str, message: str) -> None:
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
            record: dict[str, Any] = {
                "id": f"batch_req_{row.id.removeprefix('chatcmpl-')}",
                "custom_id": row.custom_id,
            }
            if row.response is not None:
                record["response"] = {
                    "status_code": 200,
                    "request_id": row.id,
                    "body": row.response,
                }
                record["error"] = None
            else:
                error = (row.error or {}).get("error", {})
                if error.get("code") in ("batch_cancelled", "batch_expired"):
                    record["response"] = None
                    record["error"] = {"code": error["code"], "message": error["message"]}
                else:
                    record["response"] = {
                        "status_code": row.error_status or 500,
                        "request_id": row.id,
                        "body": row.error,
                    }
                    record["error"] = None
            yield (json.dumps(record) + "\n").encode()
        if line_errors is not None:
            async for line_error in line_errors:
                e = line_error.error
                record = {
                    "id": f"batch_req_line{line_error.line}",
                    "custom_id": line_error.custom_id,
                    "response": None,
                    "error": {k: e[k] for k in ("code", "message", "param", "line")},
                }
                yield (json.dumps(record) + "\n").encode()


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
        )
        error = await files.write_lines(
            session,
            batch.project,
            batch.api_key_id,
            f"{batch_id}_error.jsonl",
            "batch_output",
            _output_lines(ctx, batch_id, errors=True),
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


async def tend(ctx: ApiContext) -> None:
    """Finalize batches whose jobs have all ended; expire those past their window."""
    async with ctx.sessions() as session:
        active = (
            await session.execute(
                select(
                    Batch.id,
                    (Batch.status == BatchStatus.in_progress) & (Batch.expires_at < func.now()),
                ).where(Batch.status.in_(UNFINISHED))
            )
        ).all()
    for batch_id, expired in active:
        if expired:
            # Whatever has not run by now will not: its lines are reported as batch_expired.
            await _stop_jobs(
                ctx,
                batch_id,
                "batch_expired",
                "The batch's completion window ended before this request ran.",
            )
        async with ctx.sessions() as session:
            open_jobs = await session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.batch_id == batch_id, Job.status.in_([JobStatus.queued, JobStatus.running])
                )
            )
        if not open_jobs:
            await finalize(ctx, batch_id)


async def tend_forever(ctx: ApiContext, every: float = 2.0) -> None:
    """`tend` whenever a worker reports progress, and every few seconds in any case."""
    wake = asyncio.Event()

    async def listen() -> None:
        while True:
            try:
                async with ctx.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(BATCH_PROGRESS_CHANNEL)
                    async for _ in pubsub.listen():
                        wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1)

    listener = asyncio.create_task(listen())
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), every)
            wake.clear()
            try:
                await tend(ctx)
            except Exception:
                log.exception("tending batches failed")
    finally:
        listener.cancel()
