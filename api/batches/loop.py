"""One loop per API process finalizes batches whose jobs have all ended, and expires those past
their window; a row lock elects one process for each batch."""

import asyncio
import contextlib
import logging

from sqlalchemy import func, select

from api.batches.finalize import UNFINISHED, finalize
from api.batches.service import stop_jobs
from api.context import ApiContext
from core.bus import BatchProgress
from core.tables import Batch, BatchStatus, Job, JobStatus

log = logging.getLogger(__name__)


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
            await stop_jobs(
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
                    await pubsub.subscribe(BatchProgress.channel)
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
