"""OpenAI's Batch API: validate a JSONL file line by line, run its lines as jobs, write the
output and error files.

A bad line fails alone (it goes to the error file with its line number); every other line runs.
Lines become jobs in multi-row inserts and reach workers in chunks, as low-priority work that
interactive requests overtake in the engine. One loop per API process finalizes batches whose
jobs have all ended, and expires those past their window; a row lock elects one process.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
from pydantic import ValidationError
from sqlalchemy import delete, func, insert, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from api import files
from api.context import ApiContext
from api.errors import describe
from api.stored import page
from core import capabilities
from core.errors import (
    ConflictError,
    FerryError,
    InvalidRequestError,
    NotFoundError,
    error_envelope,
)
from core.ids import new_id
from core.queue import BATCH_PROGRESS_CHANNEL, JOB_CANCEL_CHANNEL, send_jobs
from core.settings import ApiSettings
from core.tables import ApiKey, Batch, BatchLineError, BatchStatus, Job, JobStatus, ServedModel
from core.validation import (
    check_json_text,
    check_metadata,
    check_range,
    check_request,
    check_storable,
    unstorable,
)
from core.wire import ChatCompletionRequest

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
WINDOWS = {"24h": timedelta(hours=24)}
INSERT_ROWS = 1000
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


class LineError(Exception):
    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status


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


def _parse(raw: bytes, seen: set[str], settings: ApiSettings) -> tuple[str, ChatCompletionRequest]:
    """One input line as (custom_id, request); LineError if it is not a valid one."""
    limit = settings.max_batch_line_bytes
    if len(raw) > limit:
        raise LineError(
            f"The line is longer than {limit} bytes, the most a batch line may hold.",
            "line_too_long",
        )
    try:
        check_json_text(raw, settings.max_json_depth)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_json") from None
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise LineError(f"The line is not valid JSON: {exc}.", "invalid_json") from exc
    if not isinstance(line, dict):
        raise LineError("The line is not a JSON object.", "invalid_json")
    try:
        check_storable(line)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_value", exc.param) from None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("The line has no 'custom_id'.", "missing_required_parameter", "custom_id")
    if custom_id in seen:
        raise LineError(
            f"The custom_id '{custom_id}' is used by an earlier line.",
            "duplicate_custom_id",
            "custom_id",
        )
    seen.add(custom_id)
    if line.get("method") != "POST":
        raise LineError("The line's 'method' must be 'POST'.", "invalid_method", "method")
    if line.get("url") != ENDPOINT:
        raise LineError(f"The line's 'url' must be '{ENDPOINT}'.", "invalid_url", "url")
    try:
        body = ChatCompletionRequest.model_validate(line.get("body"))
    except ValidationError as exc:
        message, param, code = describe(dict(exc.errors()[0]))
        raise LineError(
            message, code or "invalid_request", f"body.{param}" if param else "body"
        ) from exc
    if body.stream:
        raise LineError("Batch requests cannot be streamed.", "invalid_value", "body.stream")
    try:
        check_request(body, settings)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_request", f"body.{exc.param}") from exc
    return custom_id, body


async def ingest(ctx: ApiContext, batch_id: str) -> None:
    """Read the batch's input file: valid lines become jobs, invalid ones line errors.

    One API process at a time validates a batch: it holds a Postgres advisory lock on it for as
    long as it reads, which its death releases. A batch left validating (its API process died or
    stopped midway) is validated again from the start by the reconciler: what the first attempt
    wrote is removed first, and nothing of it was sent to workers yet.
    """
    async with ctx.engine.connect() as lock:
        key = func.hashtext("ferry-batch:" + batch_id)
        locked = await lock.scalar(select(func.pg_try_advisory_lock(key)))
        await lock.commit()  # the lock is the connection's, not the transaction's
        if not locked:
            return  # another process is validating it
        try:
            await _ingest(ctx, batch_id)
        except Exception:
            log.exception("batch %s: validation failed", batch_id, extra={"batch_id": batch_id})
            await _fail(ctx, batch_id, "internal_error", "The batch could not be validated.")
        finally:
            await lock.scalar(select(func.pg_advisory_unlock(key)))
            await lock.commit()


async def _ingest(ctx: ApiContext, batch_id: str) -> None:
    async with ctx.sessions.begin() as session:
        batch = await session.get(Batch, batch_id)
        assert batch is not None
        if batch.status != BatchStatus.validating:
            return  # validated already (by an attempt that ended as this one began)
        # What an interrupted attempt wrote; none of its jobs has been sent.
        await session.execute(delete(Job).where(Job.batch_id == batch_id))
        await session.execute(delete(BatchLineError).where(BatchLineError.batch_id == batch_id))
        models = {m.name: m for m in await session.scalars(select(ServedModel))}
    seen: set[str] = set()
    jobs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    counts = {"lines": 0, "jobs": 0, "invalid": 0}
    by_model: dict[str, list[str]] = {}
    created = int(time.time())

    async def flush() -> None:
        async with ctx.sessions.begin() as session:
            if jobs:
                await session.execute(insert(Job), jobs)
            if errors:
                await session.execute(insert(BatchLineError), errors)
        jobs.clear()
        errors.clear()

    async for raw in files.lines(
        ctx.sessions, batch.input_file_id, ctx.settings.max_batch_line_bytes
    ):
        counts["lines"] += 1
        number = counts["lines"]
        if number > ctx.settings.batch_max_lines:
            await _fail(
                ctx,
                batch_id,
                "too_many_requests",
                f"A batch holds at most {ctx.settings.batch_max_lines} lines.",
            )
            return
        if not raw.strip():
            counts["lines"] -= 1
            continue
        custom_id = None
        try:
            custom_id, body = _parse(raw, seen, ctx.settings)
            model = models.get(body.model)
            if model is None:
                raise LineError(
                    f"The model '{body.model}' does not exist: no worker has ever served it.",
                    "model_not_found",
                    "body.model",
                    404,
                )
            try:
                capabilities.check(body, model.capabilities)
            except FerryError as exc:
                raise LineError(
                    exc.message, exc.code or "unsupported_parameter", f"body.{exc.param}"
                ) from exc
        except LineError as exc:
            counts["invalid"] += 1
            errors.append(
                {
                    "batch_id": batch_id,
                    "line": number,
                    "custom_id": custom_id if custom_id is not None else _custom_id_of(raw),
                    "error": {
                        "status": exc.status,
                        "code": exc.code,
                        "message": f"Line {number}: {exc.message}",
                        "param": exc.param,
                        "line": number,
                    },
                }
            )
        else:
            job_id = new_id("chatcmpl")
            jobs.append(
                {
                    "id": job_id,
                    "project": batch.project,
                    "api_key_id": batch.api_key_id,
                    "model": body.model,
                    "status": JobStatus.queued,
                    "request": body.model_dump(mode="json", exclude_unset=True),
                    "store": bool(body.store),
                    "metadata_": body.metadata,
                    "attempts": 0,
                    "created": created,
                    "batch_id": batch_id,
                    "custom_id": custom_id,
                    "line_number": number,
                }
            )
            by_model.setdefault(body.model, []).append(job_id)
            counts["jobs"] += 1
        if len(jobs) + len(errors) >= INSERT_ROWS:
            await flush()
    await flush()

    if counts["jobs"] == 0:
        first_errors = await _first_line_errors(ctx, batch_id)
        await _fail(
            ctx, batch_id, "no_valid_lines", "The file has no valid line.", first_errors, counts
        )
        return
    window = WINDOWS[batch.completion_window]
    async with ctx.sessions.begin() as session:
        await session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.validating)
            .values(
                status=BatchStatus.in_progress,
                in_progress_at=func.now(),
                expires_at=Batch.created_at + window,
                total=counts["lines"],
                invalid=counts["invalid"],
                model=next(iter(by_model)) if len(by_model) == 1 else None,
            )
        )
    await _dispatch(ctx, by_model)


def _custom_id_of(raw: bytes) -> str | None:
    """The custom_id of a line that failed, if it has one that can be stored."""
    try:
        value = json.loads(raw.decode("utf-8", "replace")).get("custom_id")
    except Exception:
        return None
    return value if isinstance(value, str) and unstorable(value) is None else None


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
        await session.execute(update(Batch).where(Batch.id == batch_id).values(**values))


async def get(session: AsyncSession, key: ApiKey, batch_id: str) -> Batch:
    batch = await session.get(Batch, batch_id)
    if batch is None or batch.project != key.project:
        raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


async def view(session: AsyncSession, batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object, with counts and usage from its jobs."""
    row = (
        await session.execute(
            select(
                func.count().filter(Job.status == JobStatus.succeeded),
                func.count().filter(Job.status == JobStatus.failed),
                func.coalesce(func.sum(Job.prompt_tokens), 0),
                func.coalesce(func.sum(Job.completion_tokens), 0),
            ).where(Job.batch_id == batch.id)
        )
    ).one()
    succeeded, failed = int(row[0]), int(row[1])
    prompt, completion = int(row[2] or 0), int(row[3] or 0)
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
            "completed": succeeded,
            "failed": failed + batch.invalid,
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
