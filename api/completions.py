"""Submitting a chat completion job and waiting for its result."""

import asyncio
import contextlib
import time
from functools import partial

import anyio
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import ApiContext
from core.errors import (
    FerryError,
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from core.ids import new_id
from core.queue import CHAT_COMPLETION_TASK, queue_for
from core.tables import ApiKey, Job, JobStatus, ServedModel
from core.wire import ChatCompletionRequest

# Without a live worker, how often a waiting request looks again before it gives up.
_LIVENESS_SLICE = 30.0


async def submit(session: AsyncSession, key: ApiKey, body: ChatCompletionRequest) -> Job:
    """Persist a new job for `body`; committed before anything is enqueued."""
    if body.stream:
        raise InvalidRequestError("Streaming is not supported yet.", param="stream")
    if await session.get(ServedModel, body.model) is None:
        raise ModelNotFoundError(body.model)
    job = Job(
        id=new_id("chatcmpl"),
        project=key.project,
        api_key_id=key.id,
        model=body.model,
        status=JobStatus.queued,
        request=body.model_dump(mode="json", exclude_unset=True),
        store=bool(body.store),
        metadata_=body.metadata,
        created=int(time.time()),
    )
    session.add(job)
    await session.commit()
    return job


async def enqueue(ctx: ApiContext, job: Job) -> None:
    """Send the job's task to its model's queue."""
    send = partial(
        ctx.celery.send_task, CHAT_COMPLETION_TASK, args=[job.id], queue=queue_for(job.model)
    )
    try:
        await anyio.to_thread.run_sync(send)
    except Exception as exc:
        raise ServiceUnavailableError(
            f"The job queue is unavailable; request {job.id} was saved and stays queued."
        ) from exc


async def run_and_wait(ctx: ApiContext, job: Job) -> Job:
    """Enqueue `job` and wait until it ends; the waiter wakes us, nothing polls Postgres."""
    settings = ctx.settings
    deadline = time.monotonic() + settings.sync_timeout_seconds
    with ctx.waiter.watch(job.id) as done:
        await enqueue(ctx, job)
        while True:
            live = await ctx.has_live_worker(job.model)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayTimeoutError(
                    f"Request {job.id} did not finish within {settings.sync_timeout_seconds:g} s."
                )
            slice_ = settings.no_worker_wait_seconds if not live else _LIVENESS_SLICE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), min(slice_, remaining))
            if done.is_set():
                done.clear()
                current = await _load(ctx, job.id)
                if current.status.is_final:
                    return current
                continue
            if not live and not await ctx.has_live_worker(job.model):
                current = await _load(ctx, job.id)
                if current.status.is_final:
                    return current
                if current.status == JobStatus.queued:
                    raise ServiceUnavailableError(
                        f"No worker is serving model '{job.model}' right now. "
                        f"Request {job.id} stays queued and runs when a worker starts.",
                        code="no_live_worker",
                    )


async def _load(ctx: ApiContext, job_id: str) -> Job:
    async with ctx.sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job


def result_of(job: Job) -> dict:
    """The completion of a finished job, or its stored error raised as the HTTP error."""
    if job.status == JobStatus.succeeded and job.response is not None:
        return job.response
    error = (job.error or {}).get("error") or {}
    raise FerryError(
        error.get("message") or f"Request {job.id} ended as {job.status.value}.",
        status_code=job.error_status or 500,
        type=error.get("type") or "server_error",
        param=error.get("param"),
        code=error.get("code"),
    )
