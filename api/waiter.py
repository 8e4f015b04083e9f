"""Wakes requests waiting for their job: one Redis subscription per API process.

Workers publish a JobDone (core.bus) when a job ends. Each waiting request registers an
event here before its job is enqueued, so no notification can slip past it; nothing polls Postgres.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import redis.asyncio as aioredis

from core.bus import JobDone, JobOutcome, LookupsChanged

log = logging.getLogger(__name__)


class Watch(asyncio.Event):
    """Set when the job may have ended; `outcome` is its stored result when the worker sent it."""

    outcome: JobOutcome | None = None
    # The job's end, once heard: passed on to `job_done` when the watch ends.
    ended: JobDone | None = None


class JobWaiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        lookups_changed: Callable[[], None] = lambda: None,
        job_done: Callable[[JobDone], None] = lambda done: None,
    ) -> None:
        """`lookups_changed` is called when keys, models or limits change (and after a
        reconnection); `job_done` when any job ends: at once if no request here watches it,
        else when the last watch of it ends (after the request has its answer, so that what
        `job_done` does costs that answer no time)."""
        self._redis = redis
        self._lookups_changed = lookups_changed
        self._job_done = job_done
        self._events: dict[str, set[Watch]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 5.0) -> None:
        """Subscribe; returns once subscribed, or after `timeout` if Redis is away."""
        self._task = asyncio.create_task(self._listen(), name="job-waiter")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """An event set when `job_id` may have ended; register it before enqueueing the job."""
        event = Watch()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]
            if event.ended is not None:
                self._job_done(event.ended)

    def _wake(self, done: JobDone) -> None:
        events = self._events.get(done.job_id)
        if not events:
            self._job_done(done)
            return
        for event in events:
            event.outcome = done.outcome
            event.ended = done
            event.set()

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(JobDone.channel, LookupsChanged.channel)
                    self._subscribed.set()
                    # Jobs may have ended while the subscription was down: let waiters look.
                    self._wake_all()
                    self._lookups_changed()
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        if message["channel"] in (
                            LookupsChanged.channel,
                            LookupsChanged.channel.encode(),
                        ):
                            self._lookups_changed()
                            continue
                        self._wake(JobDone.decode(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed.clear()
                log.warning("job notifications lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
