"""Submitting a chat completion job, then waiting for its result or relaying its stream."""

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api import stored
from api.cache import TtlCache
from api.context import ApiContext, in_background
from api.rate_limits import RateLimiter
from core import capabilities, output_limits
from core.bus import StreamChunk, StreamDone, StreamError, read_entry, stream_key
from core.errors import (
    ConflictError,
    FerryError,
    GatewayTimeoutError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from core.ids import new_id
from core.queue import Dispatch, send_jobs
from core.settings import ApiSettings, api_settings
from core.tables import ApiKey, Job, JobStatus, ServedModel
from core.validation import check_request
from core.wire.requests import ChatCompletionRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

# With a live worker, how long a waiting request waits before it looks at the workers again.
_LIVE_SLICE = 30.0

Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def submit(
    session: AsyncSession,
    key: ApiKey,
    body: ChatCompletionRequest,
    idempotency_key: str | None = None,
    lookups: TtlCache | None = None,
    settings: ApiSettings | None = None,
    limiter: RateLimiter | None = None,
    notify: bool = False,
    callback_url: str | None = None,
) -> tuple[Job, bool, dict[str, str]]:
    """Check `body`, count it against its project's limits (429 past one) and persist a new
    job for it, committed before anything is enqueued; the job, False, and the `x-ratelimit-*`
    headers its answer carries.

    With an idempotency key already used by this API key: the first job, and True (409 if the
    body differs); a replay is not counted. Either way the session is left without a connection:
    the caller may wait for the job's result as long as it likes without holding one of the
    pool's.

    `notify`: an asynchronous request, whose end is sent as a webhook event to its project's
    endpoints and to `callback_url` (api.webhooks).
    """
    settings = settings or api_settings()
    check_request(body, settings)
    model = lookups.get(("model", body.model)) if lookups is not None else None
    if model is None:
        model = await session.get(ServedModel, body.model)
        if model is None:
            raise ModelNotFoundError(body.model)
        if lookups is not None:
            # Detached, so that other requests' sessions can read it while this one commits.
            session.expunge(model)
            lookups.put(("model", body.model), model)
    capabilities.check(body, model.capabilities)
    output_limits.check(body, model.max_model_len, settings)
    request = body.model_dump(mode="json", exclude_unset=True)
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        first = await _first_attempt(session, key, idempotency_key, digest)
        if first is not None:
            await session.commit()
            return first, True, {}
    job_id = new_id("chatcmpl")
    # Counted in Redis while the job is inserted (one round trip overlapping the other), and
    # committed only if the limits let it through.
    admitting = (
        await limiter.admitting(key, body, model.max_model_len, job_id)
        if limiter is not None
        else None
    )
    try:
        job, replayed = await _insert(
            session,
            key,
            body,
            job_id,
            request,
            idempotency_key,
            digest,
            admitting,
            notify,
            callback_url,
        )
    except BaseException:
        await _not_stored(limiter, admitting, job_id)
        raise
    if replayed:
        await _not_stored(limiter, admitting, job_id)
    headers = admitting.result() if admitting is not None and not replayed else {}
    return job, replayed, headers


async def _not_stored(
    limiter: RateLimiter | None, admitting: "asyncio.Future[dict[str, str]] | None", job_id: str
) -> None:
    """A job counted but not stored gives its place and its tokens back (its request stays
    counted)."""
    if limiter is None or admitting is None:
        return
    with contextlib.suppress(BaseException):
        await admitting
    await limiter.release(job_id, used=0)


async def _insert(
    session: AsyncSession,
    key: ApiKey,
    body: ChatCompletionRequest,
    job_id: str,
    request: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
    admitting: "asyncio.Future[dict[str, str]] | None",
    notify: bool = False,
    callback_url: str | None = None,
) -> tuple[Job, bool]:
    job = Job(
        id=job_id,
        project=key.project,
        api_key_id=key.id,
        model=body.model,
        status=JobStatus.queued,
        request=request,
        store=bool(body.store),
        metadata_=body.metadata,
        created=int(time.time()),
        idempotency_key=idempotency_key,
        request_hash=digest if idempotency_key is not None else None,
        # Recorded as sent in the commit that creates it: no second write on every request's
        # way. `enqueue` drops the record if the broker refuses the message.
        dispatched_at=func.now(),
        notify=notify,
        callback_url=callback_url,
    )
    session.add(job)
    try:
        await session.flush()
        if admitting is not None:
            # Past a limit (RateLimitError), the insert is rolled back with the session.
            await admitting
        await session.commit()
    except IntegrityError:
        # A concurrent retry with the same key won the insert.
        await session.rollback()
        assert idempotency_key is not None
        first = await _first_attempt(session, key, idempotency_key, digest)
        if first is None:
            raise
        await session.commit()
        return first, True
    return job, False


async def _first_attempt(
    session: AsyncSession, key: ApiKey, idempotency_key: str, digest: str
) -> Job | None:
    first = await session.scalar(
        select(Job).where(Job.api_key_id == key.id, Job.idempotency_key == idempotency_key)
    )
    if first is not None and first.request_hash != digest:
        raise ConflictError(
            f"The Idempotency-Key '{idempotency_key}' was already used with another request body.",
            code="idempotency_key_reused",
        )
    return first


async def enqueue(ctx: ApiContext, job: Job) -> None:
    """Send the job's task to its model's queue.

    The job is committed first, recorded as sent. If the broker cannot take the message now, the
    record is dropped, and the reconciler sends the job once it has waited in the queue for its
    grace period; if this process dies before sending, the reconciler finds the message missing
    (api.reconciler). Either way the job still runs.
    """
    try:
        await anyio.to_thread.run_sync(send_jobs, ctx.celery, [Dispatch(job.id, job.model)])
    except Exception as exc:
        log.warning(
            "could not enqueue job %s (%s); the reconciler will send it",
            job.id,
            exc,
            extra={"job_id": job.id},
        )
        with contextlib.suppress(Exception):
            async with ctx.sessions.begin() as session:
                await session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == JobStatus.queued)
                    .values(dispatched_at=None)
                )


async def _wait(ctx: ApiContext, job: Job, attempt: Callable[[float], Awaitable[T | None]]) -> T:
    """Call `attempt(seconds)`, which waits up to that long for a result, until one comes.

    503 once no live worker serves the model and the job is still queued (it stays queued);
    504 past the synchronous timeout.
    """
    settings = ctx.settings
    deadline = time.monotonic() + settings.sync_timeout_seconds
    while True:
        live = await ctx.has_live_worker(job.model)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GatewayTimeoutError(
                f"Request {job.id} did not finish within {settings.sync_timeout_seconds:g} s."
            )
        window = _LIVE_SLICE if live else settings.no_worker_wait_seconds
        result = await attempt(min(window, remaining))
        if result is not None:
            return result
        if not live and not await ctx.has_live_worker(job.model):
            current = await _load(ctx, job.id)
            if current.status == JobStatus.queued:
                raise ServiceUnavailableError(
                    f"No worker is serving model '{job.model}' right now. "
                    f"Request {job.id} stays queued and runs when a worker starts.",
                    code="no_live_worker",
                )


async def run_and_wait(ctx: ApiContext, job: Job) -> Job:
    """Enqueue `job` and wait until it ends; the waiter wakes us, nothing polls Postgres."""
    return await wait(ctx, job, enqueue_first=True)


async def wait(ctx: ApiContext, job: Job, enqueue_first: bool = False) -> Job:
    """Wait until `job` ends (enqueueing it first if asked)."""
    if job.status.is_final:
        return job
    with ctx.waiter.watch(job.id) as done:
        if enqueue_first:
            await enqueue(ctx, job)

        async def ended(seconds: float) -> Job | None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), seconds)
            if not done.is_set():
                return None
            done.clear()
            if done.outcome is not None:
                # The worker sent what it stored: no need to read it back.
                job.status = JobStatus(done.outcome.status)
                job.response = done.outcome.response
                job.error = done.outcome.error
                job.error_status = done.outcome.error_status
                return job
            current = await _load(ctx, job.id)
            return current if current.status.is_final else None

        return await _wait(ctx, job, ended)


async def run_and_stream(ctx: ApiContext, job: Job) -> AsyncIterator[bytes]:
    """Enqueue a streamed job; once its first entry arrives, its Server-Sent Events.

    Errors before the first chunk (a bad prompt, no worker) raise here, so they are answered
    with their own status rather than inside a 200 stream.
    """
    key = stream_key(job.id)
    await enqueue(ctx, job)

    async def first(seconds: float) -> Entries | None:
        return await _read(ctx, key, b"0", seconds) or None

    entries = await _wait(ctx, job, first)
    entry = read_entry(entries[0][1])
    if isinstance(entry, StreamError):
        raise FerryError.from_envelope(entry.envelope, entry.status)
    return _events(ctx, job, key, entries)


async def _events(ctx: ApiContext, job: Job, key: str, entries: Entries) -> AsyncIterator[bytes]:
    try:
        async for event in _relay(ctx, job, key, entries):
            yield event
    finally:
        # Finished, or the client has gone: either way the stream is delivered.
        in_background(_delivered_stream(ctx, job, key))


async def _delivered_stream(ctx: ApiContext, job: Job, key: str) -> None:
    await stored.mark_delivered(ctx, job)
    await ctx.redis.delete(key)


async def _relay(ctx: ApiContext, job: Job, key: str, entries: Entries) -> AsyncIterator[bytes]:
    last = b"0"
    deadline = time.monotonic() + ctx.settings.sync_timeout_seconds
    while True:
        for entry_id, fields in entries:
            last = entry_id
            entry = read_entry(fields)
            if isinstance(entry, StreamChunk):
                yield b"data: " + entry.data + b"\n\n"
            elif isinstance(entry, StreamDone):
                yield b"data: [DONE]\n\n"
                return
            else:
                # The SDK raises on an event that carries an error.
                yield b"data: " + json.dumps(entry.envelope).encode() + b"\n\n"
                return
        if time.monotonic() >= deadline:
            error = GatewayTimeoutError(f"Request {job.id} stopped streaming.")
            yield b"data: " + json.dumps(error.envelope()).encode() + b"\n\n"
            return
        entries = await _read(ctx, key, last, _LIVE_SLICE)


async def _read(ctx: ApiContext, key: str, after: bytes, seconds: float) -> Entries:
    """Entries of `key` after `after`, waiting up to `seconds` for one to come."""
    found: Any = await ctx.redis.xread({key: after}, count=256, block=max(1, int(seconds * 1000)))
    return found[0][1] if found else []


async def _load(ctx: ApiContext, job_id: str) -> Job:
    async with ctx.sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job


def result_of(job: Job) -> dict:
    """The completion of a finished job, or its stored error raised as the HTTP error."""
    if job.status == JobStatus.succeeded and job.response is not None:
        return job.response
    raise FerryError.from_envelope(job.error, job.error_status or 500)
