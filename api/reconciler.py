"""The reconciler: Postgres says what should run; this sweep makes the broker agree.

Every few seconds, in one API process at a time (a Postgres advisory lock decides which):
- jobs running on a worker whose heartbeat has stopped go back to the queue and are sent again
  (streamed ones, whose chunks may have reached the client, and those out of attempts fail);
- queued jobs that have waited past the grace period with no message for them in the broker
  (never sent because the broker was down, lost with a restarted broker, or held unacknowledged
  by a worker that died before claiming them) are sent again;
- batches still validating past the grace period are validated again, unless an API process is
  still at it (api.batches.ingest holds a lock while it reads);
- the content of `store: false` jobs that ended FERRY_UNSTORED_PURGE_SECONDS ago is purged,
  delivered or not (nobody polled, cancelled, its client answered 503 or 504, an Idempotency-Key
  nobody retried): their request and result, a streamed one's chunks in Redis, and the
  Idempotency-Key, so that a retry after it runs as a new request. A batch's jobs are left to the
  batch, which purges them once its output file is written.
A message sent twice is harmless: a worker claims only queued jobs.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import anyio
from sqlalchemy import Update, and_, func, literal, or_, select, text, update

from api.batches.ingest import ingest
from api.context import ApiContext, in_background
from core import handback
from core.queue import (
    BATCH_PROGRESS_CHANNEL,
    JOB_DONE_CHANNEL,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    add_to_stream,
    broker_lists,
    job_ids_in_message,
    send_jobs,
    stream_key,
)
from core.tables import Batch, BatchStatus, Job, JobStatus

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key: one sweep at a time across API processes.
_LOCK = 0x66657279
# Candidates looked at per sweep; more wait for the next one.
_MAX_CANDIDATES = 200_000
# `store: false` jobs purged per statement; a sweep runs as many as it needs.
_PURGE_ROWS = 1000
# How far before the last purge's cutoff the next one looks: a job whose end was committed late
# (its finished_at is its transaction's start) is still found.
_PURGE_OVERLAP = timedelta(minutes=1)


@dataclass
class Sweep:
    """What one sweep did."""

    requeued: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        # The broker's run id, and since when it has been seen: after a restart (an empty
        # Redis), workers need a heartbeat period to show up again before any is taken for dead.
        self._broker_run: str | None = None
        self._broker_since = time.monotonic()
        # Every `store: false` job that ended before this has been purged by this process's
        # sweeps; None until the first purge, which looks at all of them.
        self._purged_before: datetime | None = None

    async def forever(self) -> None:
        every = self.ctx.settings.reconcile_seconds
        while True:
            await asyncio.sleep(every)
            try:
                done = await self.sweep()
            except Exception as exc:
                log.warning("reconciler sweep failed: %s", exc)
                continue
            if done.purged:
                log.info("reconciler: content of %d store:false jobs purged", len(done.purged))
            if done.requeued or done.given_up or done.resent:
                log.warning(
                    "reconciler: %d jobs of lost workers requeued, %d failed, %d resent",
                    len(done.requeued),
                    len(done.given_up),
                    len(done.resent),
                )

    async def sweep(self) -> Sweep:
        ctx = self.ctx
        done = Sweep()
        # First, as it needs only Postgres: content is purged on time even while Redis is away.
        await self._unstored_content(done)
        run_id = (await ctx.redis.info("server")).get("run_id")
        if run_id != self._broker_run:
            self._broker_run, self._broker_since = run_id, time.monotonic()
        live = [beat.worker_id for beat in await ctx.live_workers()]
        settle = time.monotonic() - self._broker_since >= ctx.settings.worker_ttl_seconds
        if settle:
            await self._lost_workers(live, done)
        await self._lost_messages(done)
        await self._stalled_batches(done)
        return done

    async def _unstored_content(self, done: Sweep) -> None:
        ctx = self.ctx
        delay = timedelta(seconds=ctx.settings.unstored_purge_seconds)
        since = None if self._purged_before is None else self._purged_before - _PURGE_OVERLAP
        while True:
            async with ctx.sessions.begin() as session:
                if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                    return
                cutoff = await session.scalar(select(func.now() - literal(delay)))
                purged = (await session.execute(purge_unstored(cutoff, since, _PURGE_ROWS))).all()
            ids = [job_id for job_id, _ in purged]
            done.purged += ids
            if ids:
                # A streamed job nobody read to its end leaves its chunks in Redis.
                try:
                    await ctx.redis.delete(*(stream_key(job_id) for job_id in ids))
                except Exception as exc:
                    log.warning("streams of purged jobs not deleted: %s", exc)
            if len(ids) < _PURGE_ROWS:
                self._purged_before = cutoff
                return
            since = max(finished for _, finished in purged)

    async def _stalled_batches(self, done: Sweep) -> None:
        grace = self.ctx.settings.requeue_grace_seconds
        async with self.ctx.sessions() as session:
            stalled = list(
                await session.scalars(
                    select(Batch.id).where(
                        Batch.status == BatchStatus.validating,
                        Batch.created_at < text(f"now() - interval '{float(grace)} seconds'"),
                    )
                )
            )
        # Each tries the batch's lock: one still being validated elsewhere is left alone.
        for batch_id in stalled:
            in_background(ingest(self.ctx, batch_id))

    async def _lost_workers(self, live: list[str], done: Sweep) -> None:
        ctx = self.ctx
        lost = and_(
            Job.status == JobStatus.running, or_(Job.worker.is_(None), Job.worker.not_in(live))
        )
        max_attempts = ctx.settings.max_attempts
        async with ctx.sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                return
            given_up = (
                await session.execute(
                    handback.give_up(
                        lost, max_attempts, "The worker running this request was lost."
                    )
                )
            ).all()
            requeued = (await session.execute(handback.requeue(lost, max_attempts))).all()
        await self._send(
            [(job_id, model, batch_id is not None) for job_id, model, batch_id in requeued]
        )
        for job_id, _batch_id, stream in given_up:
            if stream:
                error = handback.WorkerLostError("The worker running this request was lost.")
                async with ctx.redis.pipeline(transaction=False) as pipe:
                    add_to_stream(
                        pipe,
                        job_id,
                        {"error": json.dumps(error.envelope()), "status": error.status_code},
                    )
                    await pipe.execute()
            await ctx.redis.publish(JOB_DONE_CHANNEL, job_id)
        for batch_id in {b for _, _, b in requeued if b} | {b for _, b, _ in given_up if b}:
            await ctx.redis.publish(BATCH_PROGRESS_CHANNEL, batch_id)
        done.requeued = [row[0] for row in requeued]
        done.given_up = [row[0] for row in given_up]

    async def _lost_messages(self, done: Sweep) -> None:
        ctx = self.ctx
        grace = ctx.settings.requeue_grace_seconds
        waited = text(f"now() - interval '{float(grace)} seconds'")
        async with ctx.sessions() as session:
            candidates = (
                await session.execute(
                    select(Job.id, Job.model, Job.batch_id)
                    .outerjoin(Batch, Batch.id == Job.batch_id)
                    .where(
                        Job.status == JobStatus.queued,
                        Job.queued_at < waited,
                        # A batch's jobs are sent once the whole file is validated.
                        or_(
                            Job.batch_id.is_(None),
                            and_(
                                Batch.status == BatchStatus.in_progress,
                                Batch.in_progress_at < waited,
                            ),
                        ),
                    )
                    .limit(_MAX_CANDIDATES)
                )
            ).all()
        if not candidates:
            return
        present = await self._in_broker({model for _, model, _ in candidates}, grace)
        missing = [row for row in candidates if row[0] not in present]
        if not missing:
            return
        async with ctx.sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                return
            resent = (
                await session.execute(
                    update(Job)
                    .where(Job.id.in_([row[0] for row in missing]), Job.status == JobStatus.queued)
                    .values(queued_at=func.now())
                    .returning(Job.id, Job.model, Job.batch_id)
                )
            ).all()
        await self._send(
            [(job_id, model, batch_id is not None) for job_id, model, batch_id in resent]
        )
        done.resent = [row[0] for row in resent]

    async def _in_broker(self, models: set[str], grace: float) -> set[str]:
        """Ids of the jobs a message in the broker will deliver: waiting in a queue, or held
        by a consumer for less than the grace period (longer means the consumer is gone)."""
        redis = self.ctx.redis
        present: set[str] = set()
        for model in models:
            for key in broker_lists(model):
                for raw in await redis.lrange(key, 0, -1):
                    present.update(job_ids_in_message(raw))
        held: dict[Any, Any] = await redis.hgetall(UNACKED_KEY)
        if held:
            since = time.time() - grace
            fresh = set(await redis.zrangebyscore(UNACKED_INDEX_KEY, since, "+inf"))
            for tag, raw in held.items():
                if tag in fresh:
                    present.update(job_ids_in_message(raw))
        return present

    async def _send(self, jobs: list[tuple[str, str, bool]]) -> None:
        if jobs:
            await anyio.to_thread.run_sync(partial(send_jobs, self.ctx.celery, jobs))


def purge_unstored(cutoff: datetime, since: datetime | None, limit: int) -> Update:
    """Purge the content of the first `limit` `store: false` jobs (not a batch's) to end before
    `cutoff` (and from `since`, if given); RETURNING their ids and ends.

    The accounting stays (ids, owner, model, status, usage, timestamps, error): a poll then
    answers 404, as after a delivery. The metadata goes with the content, and the
    Idempotency-Key with the content it answered.
    """
    ended = [
        ~Job.store,
        Job.batch_id.is_(None),
        Job.finished_at < cutoff,
        or_(Job.request.is_not(None), Job.response.is_not(None)),
    ]
    if since is not None:
        ended.append(Job.finished_at >= since)
    chosen = select(Job.id).where(*ended).order_by(Job.finished_at).limit(limit)
    return (
        update(Job)
        .where(Job.id.in_(chosen.scalar_subquery()))
        .values(
            request=None, response=None, metadata_=None, idempotency_key=None, request_hash=None
        )
        .returning(Job.id, Job.finished_at)
    )
