"""A batch's input file read into jobs: valid lines become jobs, invalid ones line errors.

A bad line fails alone (it goes to the error file with its line number); every other line runs.
Lines are parsed in other processes (api.parsing), never on the event loop, and become jobs in
multi-row inserts, one short transaction per run of lines; they reach workers in chunks, as
low-priority work that interactive requests overtake in the engine.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Any

from sqlalchemy import Text, bindparam, cast, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api import files, throttled
from api.batches.lines import Line, Served, read_lines
from api.batches.service import WINDOWS
from api.context import ApiContext
from api.parsing import Parsers
from core import project_limits
from core.ids import new_id
from core.queue import Dispatch, dispatch_async
from core.tables import (
    Batch,
    BatchLineError,
    BatchStatus,
    Job,
    JobStatus,
    Project,
    ProjectLimit,
    ServedModel,
)

log = logging.getLogger(__name__)

# Lines parsed in one go (in another process) and stored in one short transaction: at most this
# many, and no more bytes than READ_BYTES but for the last line.
INSERT_ROWS = 250
READ_BYTES = 1 << 20


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
    lines = Lines(batch, ctx.settings.batch_max_lines)
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
        refused = await _over_queue_limit(session, batch, lines.tokens)
        if refused is None:
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
                    queued_tokens=lines.tokens,
                )
            )
    if refused is not None:
        model, message = refused
        counts = {"lines": lines.lines, "invalid": lines.invalid}
        if await _fail(ctx, batch_id, "token_limit_exceeded", message, counts=counts):
            await _count_refusal(ctx, batch.project, model)
        return
    if started.rowcount:
        await _dispatch(ctx, lines.project, lines.by_model)
    else:
        await _cancelled_while_validating(ctx, batch_id, lines.lines, lines.invalid)


async def _count_refusal(ctx: ApiContext, project: str, model: str) -> None:
    """Count a batch refused by its project's batch queue limit among the project's refusals."""
    try:
        await throttled.count(ctx.redis, project, model, "batch_queue_tokens")
    except Exception as exc:
        # The batch has failed as it should; only the figure misses it.
        log.warning("could not count batch refused on %s for %s: %s", model, project, exc)


async def _over_queue_limit(
    session: AsyncSession, batch: Batch, tokens: dict[str, int]
) -> tuple[str, str] | None:
    """The model on which the batch does not fit in its project's batch queue (its estimate past
    what the project's batches in progress leave of the limit) and why, or None if it fits.

    The project's row stays locked until the caller's transaction ends, in which the batch,
    if it fits, starts holding its tokens: two batches of a project never both take the last
    room.
    """
    rows = list(
        await session.scalars(select(ProjectLimit).where(ProjectLimit.project == batch.project))
    )
    limited = {
        model: most
        for model in tokens
        if (limits := project_limits.for_model(rows, model)) is not None
        and (most := limits.batch_queue_tokens) is not None
    }
    if not limited:
        return None
    await session.execute(
        select(Project.name).where(Project.name == batch.project).with_for_update()
    )
    others = (
        await session.execute(
            select(
                Batch.queued_tokens, Batch.total, Batch.invalid, Batch.completed, Batch.failed
            ).where(
                Batch.project == batch.project,
                Batch.status == BatchStatus.in_progress,
                Batch.id != batch.id,
            )
        )
    ).all()
    for model, most in sorted(limited.items()):
        in_use = project_limits.batch_tokens_in_use(others, model)
        if in_use + tokens[model] > most:
            return model, project_limits.batch_queue_refused(
                model, batch.project, most, in_use, tokens[model]
            )
    return None


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


async def _store(ctx: ApiContext, lines: "Lines", read: list[Line | None]) -> bool:
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


class Lines:
    """What needs a batch's lines in order: their numbers, and custom_ids seen before."""

    def __init__(self, batch: Batch, most: int):
        self.batch_id, self.project, self.api_key_id = batch.id, batch.project, batch.api_key_id
        self.most = most
        self.created = int(time.time())
        self.seen: set[str] = set()
        self.by_model: dict[str, list[str]] = {}
        # The valid lines' estimated tokens, by model (core.project_limits.estimate_tokens).
        self.tokens: dict[str, int] = {}
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
            self.tokens[line.job["model"]] = (
                self.tokens.get(line.job["model"], 0) + line.job["tokens"]
            )
            self.jobs += 1
        return jobs, errors, False


async def _dispatch(ctx: ApiContext, project: str, by_model: dict[str, list[str]]) -> None:
    """Send the jobs to the project's batch queues of their models, BATCH_CHUNK ids per message.

    Should this fail (or the process die first), the reconciler sends them.
    """
    jobs = [Dispatch(job_id, model, project) for model, ids in by_model.items() for job_id in ids]
    try:
        await dispatch_async(ctx.celery, ctx.sessions, jobs)
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
) -> bool:
    """Fail a batch still validating (one cancelled meanwhile stays cancelled); whether it
    failed here."""
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
    return bool(failed.rowcount)
