"""The reconciler: Postgres says what should run; this sweep makes the broker agree.

Every few seconds, in one API process at a time (a Postgres advisory lock decides which):
- jobs running on a worker whose heartbeat has stopped go back to the queue and are sent again
  (streamed ones, whose chunks may have reached the client, and those out of attempts fail), the
  way a worker hands back its own (core.handback);
- queued jobs whose message is not in the broker are sent again. Whether it is, Postgres says:
  each job records when its message was handed to the broker (`dispatched_at`, core.queue), and
  the sweep never reads the broker's queues, so its cost does not grow with their length. A job
  is sent again once it has waited past the grace period and
  - it has no record: never sent (the broker was down, the API died between its commit and its
    send; a batch's jobs once the whole file is validated), or
  - the broker lost its data (a Redis restarted empty): the mark the sweep leaves in Redis,
    which goes with the queues, is gone, and every queued job's record is dropped, or
  - its queue has delivered past it: a job of the same queue (model, and interactive or a
    project's batch work) sent
    more than the grace period after it has been claimed, running now or ended since the last
    sweeps. Queues are first in, first out, so its message is gone: held by a worker that died
    before claiming it (Kombu would deliver it again only after its visibility timeout), or sent
    by an API process that died before recording it. A job merely far back in a long queue has
    nothing sent after it claimed yet, and is left alone; or
  - a live worker of its model has been idle for longer than the grace period (`idle_since` in
    its heartbeat): a worker with room takes whatever its queues hold at once, so a message sent
    more than the grace period ago is gone, even when no later traffic shows it;
- batches still validating past the grace period are validated again, unless an API process is
  still at it (api.batches.ingest holds a lock while it reads);
- jobs counted against their project's limits that have ended, but that the API process which
  admitted them did not release (it died, or missed the notification), are released
  (api.rate_limits);
- files past their expiry, stored completions past their project's retention and webhook
  events 30 days old are deleted (api.retention);
- the content of `store: false` jobs that ended FERRY_UNSTORED_PURGE_SECONDS ago is purged,
  delivered or not (nobody polled, cancelled, its client answered 503 or 504, an Idempotency-Key
  nobody retried): their request and result, a streamed one's chunks in Redis, and the
  Idempotency-Key, so that a retry after it runs as a new request. A batch's jobs are left to the
  batch, which purges them once its output file is written.
A message sent twice is harmless: a worker claims only queued jobs.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    String,
    Update,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from api import retention
from api.batches.ingest import ingest
from api.context import ApiContext, in_background
from api.retention import Retained
from core import handback
from core.bus import stream_key
from core.queue import BROKER_MARK_KEY, Dispatch, WorkerBeat, dispatch_async
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
    # Deleted as their retention said (api.retention).
    retained: Retained = field(default_factory=Retained)
    # Jobs released from their project's limits by the sweep, not by the process that admitted
    # them (it died, or missed their end).
    released: int = 0


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
            retained = done.retained
            if retained.files or retained.completions or retained.webhook_events:
                log.info(
                    "retention: %d expired files, %d stored completions and %d webhook events "
                    "deleted",
                    len(retained.files),
                    len(retained.completions),
                    retained.webhook_events,
                )
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
        # First, as they need only Postgres: content is purged, and expired files and stored
        # completions deleted, on time even while Redis is away.
        await self._unstored_content(done)
        done.retained = await retention.sweep(ctx.sessions)
        run_id = (await ctx.redis.info("server")).get("run_id")
        if run_id != self._broker_run:
            self._broker_run, self._broker_since = run_id, time.monotonic()
        beats = await ctx.live_workers()
        live = [beat.worker_id for beat in beats]
        settle = time.monotonic() - self._broker_since >= ctx.settings.worker_ttl_seconds
        if settle:
            await self._lost_workers(live, done)
        await self._broker_lost(run_id)
        await self._lost_messages(done, _idle_models(beats, ctx.settings.requeue_grace_seconds))
        await self._stalled_batches(done)
        if ctx.limiter is not None:
            done.released = await ctx.limiter.sweep()
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
                        Batch.created_at < _ago(grace),
                    )
                )
            )
        # Each tries the batch's lock: one still being validated elsewhere is left alone.
        for batch_id in stalled:
            in_background(ingest(self.ctx, batch_id))

    async def _lost_workers(self, live: list[str], done: Sweep) -> None:
        ctx = self.ctx
        lost_jobs = and_(
            Job.status == JobStatus.running, or_(Job.worker.is_(None), Job.worker.not_in(live))
        )
        reason = "The worker running this request was lost."
        give_up, requeue = handback.statements(lost_jobs, ctx.settings.max_attempts, reason)
        async with ctx.sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                return
            given_up = (await session.execute(give_up)).all()
            lost = handback.Lost(given_up, (await session.execute(requeue)).all(), reason)
        await dispatch_async(ctx.celery, ctx.sessions, lost.to_send())
        async with ctx.redis.pipeline(transaction=False) as pipe:
            lost.tell(pipe)
            await pipe.execute()
        done.requeued = [row[0] for row in lost.requeued]
        done.given_up = [row[0] for row in lost.given_up]

    async def _broker_lost(self, run_id: str | None) -> None:
        """If the broker has lost its data since the last sweep, drop every queued job's dispatch
        record (the jobs are then sent again), then leave the mark again."""
        ctx = self.ctx
        if await ctx.redis.exists(BROKER_MARK_KEY):
            return
        async with ctx.sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                return
            await session.execute(
                update(Job)
                .where(Job.status == JobStatus.queued, Job.dispatched_at.is_not(None))
                .values(dispatched_at=None)
            )
        # After the commit: should it fail, the next sweep finds the mark missing still.
        await ctx.redis.set(BROKER_MARK_KEY, run_id or "")

    async def _lost_messages(self, done: Sweep, idle: set[str]) -> None:
        ctx = self.ctx
        grace = ctx.settings.requeue_grace_seconds
        async with ctx.sessions() as session:
            lost = set(await session.scalars(_never_sent(grace)))
            # Every claim is seen: running now, or ended within two sweeps.
            recent = 2 * ctx.settings.reconcile_seconds
            for model, batch_project, mark in await session.execute(_delivered_through(recent)):
                queue = _of_queue(batch_project)
                passed = _passed(model, queue, mark - timedelta(seconds=grace))
                lost.update(await session.scalars(passed))
            for model in idle:
                lost.update(await session.scalars(_passed(model, true(), _ago(grace))))
        if not lost:
            return
        async with ctx.sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_LOCK))):
                return
            resent = (
                await session.execute(
                    update(Job)
                    .where(Job.id == func.any(_ids(sorted(lost))), Job.status == JobStatus.queued)
                    .values(queued_at=func.now(), dispatched_at=None)
                    .returning(Job.id, Job.model, Job.project, Job.batch_id)
                )
            ).all()
        await dispatch_async(ctx.celery, ctx.sessions, [Dispatch.of(*row) for row in resent])
        done.resent = [row[0] for row in resent]


def _idle_models(beats: list[WorkerBeat], grace: float) -> set[str]:
    """The models one of whose live workers has been idle for longer than `grace` seconds."""
    cutoff = time.time() - grace
    return {b.model for b in beats if b.idle_since is not None and b.idle_since < cutoff}


def _ago(seconds: float) -> ColumnElement[datetime]:
    return func.now() - literal(timedelta(seconds=seconds))


def _ids(ids: list[str]) -> BindParameter[Any]:
    return bindparam("ids", ids, type_=ARRAY(String))


def _never_sent(grace: float) -> Select:
    """Queued jobs with no dispatch record that have waited past the grace period (a batch's are
    sent once the whole file is validated: counted from then)."""
    waited = _ago(grace)
    return (
        select(Job.id)
        .outerjoin(Batch, Batch.id == Job.batch_id)
        .where(
            Job.status == JobStatus.queued,
            Job.dispatched_at.is_(None),
            Job.queued_at < waited,
            or_(
                Job.batch_id.is_(None),
                and_(Batch.status == BatchStatus.in_progress, Batch.in_progress_at < waited),
            ),
        )
        .limit(_MAX_CANDIDATES)
    )


def _delivered_through(seconds: float) -> Select:
    """Per queue (model, and project for batch work): the latest dispatch among jobs claimed from
    it since, running now or ended within `seconds`."""
    batch_project = case((Job.batch_id.is_not(None), Job.project)).label("batch_project")
    return (
        select(Job.model, batch_project, func.max(Job.dispatched_at))
        .where(
            Job.started_at >= Job.dispatched_at,
            or_(Job.status == JobStatus.running, Job.finished_at > _ago(seconds)),
        )
        .group_by(Job.model, batch_project)
    )


def _of_queue(batch_project: str | None) -> ColumnElement[bool]:
    """The jobs of one of a model's queues: the interactive one (None), or a project's batch
    queue. Each is first in, first out."""
    if batch_project is None:
        return Job.batch_id.is_(None)
    return and_(Job.batch_id.is_not(None), Job.project == batch_project)


def _passed(model: str, queue: ColumnElement[bool], before: Any) -> Select:
    """Queued jobs of a model's queue (or queues) sent before `before`."""
    return (
        select(Job.id)
        .where(
            Job.status == JobStatus.queued, Job.model == model, queue, Job.dispatched_at < before
        )
        .limit(_MAX_CANDIDATES)
    )


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
