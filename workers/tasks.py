"""Celery tasks: thin, by id, idempotent. The engine host does the work."""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import redis
import redis.asyncio as aioredis
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import handback, logs
from core.errors import CancelledError, EngineError, FerryError
from core.queue import (
    BATCH_CHUNK,
    BATCH_PROGRESS_CHANNEL,
    CHAT_COMPLETION_TASK,
    JOB_CANCEL_CHANNEL,
    JOB_DONE_CHANNEL,
    add_to_stream,
    batch_queue_for,
    job_done_message,
    make_celery,
    send_jobs,
)
from core.settings import WorkerSettings
from workers import jobs, metrics, shaping
from workers.engine import EngineDead, LoopHost, kill_engine_processes

log = logging.getLogger(__name__)

app = make_celery(WorkerSettings(), "ferry-worker")

# What a client reads when the engine fails on its request; the cause goes to the worker's log
# only (engine and database text can name internals and other requests' values).
ENGINE_FAILED = "The engine failed on this request; its worker's log has the cause."


@dataclass
class Runtime:
    """What tasks use; set once by the worker before it consumes."""

    worker_id: str
    model: str
    system_fingerprint: str
    engine: LoopHost
    sessions: sessionmaker[Session]
    redis: redis.Redis
    # Used only on the engine's loop: stream chunks are written from there.
    stream_redis: aioredis.Redis
    max_attempts: int = 3
    # Jobs in the engine now, by id: cancelling one's future aborts it.
    inflight: dict[str, concurrent.futures.Future] = field(default_factory=dict)
    # Set on SIGTERM: take no more work.
    stopping: threading.Event = field(default_factory=threading.Event)

    def cancel(self, job_id: str) -> bool:
        """Abort a job if it runs here."""
        future = self.inflight.get(job_id)
        return future.cancel() if future is not None else False


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


async def relay_stream(
    rt: Runtime, job_id: str, fields: dict[str, Any], answering: shaping.Answering
) -> dict[str, Any]:
    """Stream a job's chunks into its Redis stream as they come; the whole completion at the end."""
    assembler = shaping.StreamAssembler(answering)
    markup = shaping.ToolMarkupFilter() if fields.get("tools") else None
    try:
        async for raw in rt.engine.stream(job_id, fields):
            if markup is not None:
                markup(raw)
            assembler.add(raw)
            shaped = shaping.chunk(raw, answering)
            if shaped is not None:
                await write_stream(rt, job_id, {"chunk": json.dumps(shaped)})
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            error: FerryError = CancelledError()
        elif isinstance(exc, FerryError):
            error = exc
        else:
            log.error("stream of job %s failed: %r", job_id, exc, extra=logs.job_fields(job_id))
            error = EngineError(ENGINE_FAILED)
        await write_stream(
            rt, job_id, {"error": json.dumps(error.envelope()), "status": error.status_code}
        )
        raise
    return assembler.completion()


async def write_stream(rt: Runtime, job_id: str, entry: dict[Any, Any]) -> None:
    """An entry of a job's stream, whose expiry each write sets again (core.queue)."""
    async with rt.stream_redis.pipeline(transaction=False) as pipe:
        add_to_stream(pipe, job_id, entry)
        await pipe.execute()


def _answering(rt: Runtime, claimed: jobs.ClaimedJob) -> shaping.Answering:
    """How a claimed job's answer is labelled and shaped."""
    return shaping.Answering.for_request(
        claimed.request,
        id=claimed.id,
        model=claimed.model,
        created=claimed.created,
        system_fingerprint=rt.system_fingerprint,
        metadata=claimed.metadata,
        batch_id=claimed.batch_id,
    )


@app.task(name=CHAT_COMPLETION_TASK)
def chat_completion(job_id: str) -> None:
    """Run one chat completion job to its end."""
    rt = _runtime
    assert rt is not None, "the worker has not installed its runtime"
    if rt.engine.dead.is_set():
        # Claim nothing more: the job stays queued for a worker with an engine.
        die(rt, EngineDead("the engine has stopped"))
    claimed = jobs.claim(rt.sessions, job_id, rt.worker_id)
    if claimed is None:
        log.info(
            "job %s is not queued (ended, or running elsewhere); skipping",
            job_id,
            extra=logs.job_fields(job_id, worker=rt.worker_id),
        )
        return
    body = claimed.request
    stream = bool(body.get("stream"))
    answering = _answering(rt, claimed)
    fields = shaping.engine_fields(body, stream)
    metrics.job_started()
    outcome: jobs.Outcome | None = None
    try:
        if stream:
            future = rt.engine.submit(relay_stream(rt, job_id, fields, answering))
        else:
            future = rt.engine.submit(rt.engine.complete(job_id, fields))
        rt.inflight[job_id] = future
        try:
            result = future.result()
        finally:
            rt.inflight.pop(job_id, None)
        outcome = jobs.Outcome(
            job_id,
            result if stream else shaping.completion(result, answering),
            batch_id=claimed.batch_id,
        )
    except concurrent.futures.CancelledError:
        log.info("job %s cancelled", job_id, extra=logs.job_fields(job_id, worker=rt.worker_id))
        metrics.job_finished("cancelled")
    except EngineDead as exc:
        die(rt, exc)
    except FerryError as exc:
        outcome = jobs.Outcome(job_id, None, exc.envelope(), exc.status_code, claimed.batch_id)
    except Exception:
        log.exception("job %s failed", job_id, extra=logs.job_fields(job_id, worker=rt.worker_id))
        metrics.engine_error()
        error = EngineError(ENGINE_FAILED)
        outcome = jobs.Outcome(job_id, None, error.envelope(), error.status_code, claimed.batch_id)
    stored = _store_outcomes(rt, [outcome]) if outcome is not None else 0
    if stream and outcome is not None and outcome.response is not None:
        # After the result is stored: a client that sees the end can read it back at once.
        rt.engine.run(write_stream(rt, job_id, {"done": "1"}))
    # What was stored goes with the notification, so the waiting API need not read it back;
    # not for a stream (its client has read the chunks) nor a job that had ended otherwise.
    sent = outcome.sent() if stored and outcome is not None and not stream else None
    rt.redis.publish(JOB_DONE_CHANNEL, job_done_message(job_id, sent))


# vLLM schedules lower values first: interactive requests (0) overtake batch work.
BATCH_PRIORITY = 10


@dataclass
class Chunk:
    """A batch chunk in the engine: its jobs, by id, with how to label each and its future."""

    running: dict[str, tuple[shaping.Answering, concurrent.futures.Future]]
    message: Any = None
    # Jobs whose results are not stored yet; the message is acknowledged at 0.
    left: int = 0


def start_chunk(
    rt: Runtime,
    job_ids: list[str],
    on_job_end: Callable[[Chunk, str], None] | None = None,
    message: Any = None,
) -> Chunk | None:
    """Claim a chunk's queued jobs and put them all in the engine; None if none was queued.

    `on_job_end(chunk, job_id)` is called as each job ends (on the engine's loop).
    """
    if rt.engine.dead.is_set():
        die(rt, EngineDead("the engine has stopped"))
    claimed = jobs.claim_many(rt.sessions, job_ids, rt.worker_id)
    if not claimed:
        return None
    chunk = Chunk(running={}, message=message, left=len(claimed))
    metrics.job_started(len(claimed))
    for job in claimed:
        fields = {
            **shaping.engine_fields(job.request, stream=False),
            "priority": BATCH_PRIORITY,
        }
        try:
            future = rt.engine.submit(rt.engine.complete(job.id, fields))
        except EngineDead as exc:
            die(rt, exc)
        rt.inflight[job.id] = future
        chunk.running[job.id] = (_answering(rt, job), future)
    if on_job_end is not None:
        for job_id, (_, future) in chunk.running.items():
            future.add_done_callback(partial(_ended, on_job_end, chunk, job_id))
    return chunk


def _ended(
    on_job_end: Callable[[Chunk, str], None], chunk: Chunk, job_id: str, _future: Any
) -> None:
    on_job_end(chunk, job_id)


def _outcome(job_id: str, answering: shaping.Answering, future: Any) -> jobs.Outcome | None:
    """A finished job's result or error; None if it was cancelled. Raises EngineDead."""
    batch_id = answering.batch_id
    try:
        return jobs.Outcome(
            job_id, shaping.completion(future.result(), answering), batch_id=batch_id
        )
    except concurrent.futures.CancelledError:
        return None
    except EngineDead:
        raise
    except FerryError as exc:
        return jobs.Outcome(job_id, None, exc.envelope(), exc.status_code, batch_id)
    except Exception:
        log.exception("job %s failed", job_id, extra=logs.job_fields(job_id, batch_id))
        metrics.engine_error()
        error = EngineError(ENGINE_FAILED)
        return jobs.Outcome(job_id, None, error.envelope(), error.status_code, batch_id)


def store_results(rt: Runtime, ended: list[tuple[Chunk, str]]) -> None:
    """Store the results of ended batch jobs in one transaction, and say so to the API."""
    outcomes: list[jobs.Outcome] = []
    dead: EngineDead | None = None
    batches: set[str] = set()
    for chunk, job_id in ended:
        answering, future = chunk.running[job_id]
        rt.inflight.pop(job_id, None)
        if answering.batch_id is not None:
            batches.add(answering.batch_id)
        try:
            outcome = _outcome(job_id, answering, future)
        except EngineDead as exc:
            dead = exc
            continue
        if outcome is not None:
            outcomes.append(outcome)
        else:
            metrics.job_finished("cancelled")
    # Even when the engine died: the jobs that did end keep their results.
    _store_outcomes(rt, outcomes)
    if dead is not None:
        die(rt, dead)
    with contextlib.suppress(redis.RedisError):
        for batch_id in batches:
            rt.redis.publish(BATCH_PROGRESS_CHANNEL, batch_id)


def _store_outcomes(rt: Runtime, outcomes: list[jobs.Outcome]) -> int:
    """Store results, trying again while Postgres is away: a finished job's result is kept.

    Returns how many were stored (not those of jobs that had already ended).
    """
    delay = 0.5
    stored = 0
    while outcomes:
        try:
            with rt.sessions.begin() as session:
                stored = jobs.finish_many(session, outcomes)
            break
        except OperationalError as exc:
            log.warning("could not store %d results (%s); retrying", len(outcomes), exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    for outcome in outcomes:
        if outcome.response is not None:
            metrics.job_finished("succeeded", outcome.response.get("usage"))
        else:
            metrics.job_finished("failed")
    return stored


class BatchPuller(threading.Thread):
    """Pulls batch chunks from the model's batch queue while the engine has room for them.

    A worker holds at most `room` batch jobs, so the chunks of a batch spread over every worker
    serving the model, and the engine stays full: a chunk is pulled as soon as room frees up,
    job by job. Results are stored as jobs end, many per transaction (a finisher thread takes
    whatever has ended since its last write); a chunk's message is acknowledged once all of its
    results are stored. A worker that dies leaves its messages unacknowledged and its jobs
    running, which the reconciler hands back.
    """

    def __init__(self, rt: Runtime, room: int) -> None:
        super().__init__(name="batch-puller", daemon=True)
        self.rt = rt
        self.room = max(room, BATCH_CHUNK)
        self.in_engine = 0
        self.changed = threading.Condition()
        self.ended: queue.Queue[tuple[Chunk, str]] = queue.Queue()
        self.to_ack: queue.Queue[Any] = queue.Queue()
        self.chunks = 0
        self.idle = threading.Event()
        self.finisher = threading.Thread(target=self._finish, name="batch-finisher", daemon=True)

    def run(self) -> None:
        self.finisher.start()
        while True:
            try:
                with app.connection_for_read() as conn:
                    self._pull(conn.default_channel, batch_queue_for(self.rt.model))
                return
            except Exception as exc:
                if self.rt.stopping.is_set() and self.chunks == 0:
                    self.idle.set()
                    return
                log.warning("batch queue unavailable (%s); reconnecting", exc)
                time.sleep(1)

    def _pull(self, channel: Any, name: str) -> None:
        while True:
            self._ack()
            with self.changed:
                if self.rt.stopping.is_set():
                    if self.chunks == 0:
                        self.idle.set()
                        return
                    self.changed.wait(0.2)
                    continue
                if self.in_engine + BATCH_CHUNK > self.room:
                    self.changed.wait(0.2)
                    continue
            message = channel.basic_get(name, no_ack=False)
            if message is None:
                self.rt.stopping.wait(0.1)
                continue
            job_ids = message.decode()[0][0]
            with self.changed:
                # Counted up front: the chunk's jobs may end before start_chunk returns.
                self.chunks += 1
                self.in_engine += len(job_ids)
            chunk: Chunk | None = None
            try:
                chunk = start_chunk(self.rt, job_ids, self._job_ended, message)
                if chunk is None:  # all of its jobs had ended or run elsewhere
                    message.ack()
            except OperationalError as exc:
                log.warning("could not claim a batch chunk (%s); handing it back", exc)
                message.reject(requeue=True)
                time.sleep(1)
            with self.changed:
                self.in_engine -= len(job_ids) - (len(chunk.running) if chunk else 0)
                if chunk is None:
                    self.chunks -= 1
                self.changed.notify_all()

    def _job_ended(self, chunk: Chunk, job_id: str) -> None:
        self.ended.put((chunk, job_id))
        with self.changed:
            self.in_engine -= 1
            self.changed.notify_all()

    def _finish(self) -> None:
        while True:
            ended = [self.ended.get()]
            while len(ended) < 512:
                try:
                    ended.append(self.ended.get_nowait())
                except queue.Empty:
                    break
            try:
                store_results(self.rt, ended)
            except Exception:
                log.exception("could not store %d batch results", len(ended))
            done = []
            for chunk, _ in ended:
                chunk.left -= 1
                if chunk.left == 0:
                    done.append(chunk)
            for chunk in done:
                self.to_ack.put(chunk.message)
            with self.changed:
                self.chunks -= len(done)
                self.changed.notify_all()

    def _ack(self) -> None:
        while True:
            try:
                message = self.to_ack.get_nowait()
            except queue.Empty:
                return
            try:
                message.ack()
            except Exception as exc:  # a restarted broker has forgotten the delivery
                log.info("could not acknowledge a batch chunk: %s", exc)


_dying = threading.Lock()


def hand_back(rt: Runtime, reason: str) -> None:
    """Give this worker's running jobs back to the queue (or fail those that cannot run again)."""
    where = handback.running_on([rt.worker_id])
    with rt.sessions.begin() as session:
        given_up = session.execute(handback.give_up(where, rt.max_attempts, reason)).all()
        requeued = session.execute(handback.requeue(where, rt.max_attempts)).all()
    log.warning("handed back %d jobs, failed %d: %s", len(requeued), len(given_up), reason)
    send_jobs(app, [(job_id, model, batch_id is not None) for job_id, model, batch_id in requeued])
    for job_id, _batch_id, stream in given_up:
        if stream:
            error = handback.WorkerLostError(reason)
            with contextlib.suppress(Exception), rt.redis.pipeline(transaction=False) as pipe:
                add_to_stream(
                    pipe,
                    job_id,
                    {"error": json.dumps(error.envelope()), "status": error.status_code},
                )
                pipe.execute()
        rt.redis.publish(JOB_DONE_CHANNEL, job_id)
    batches = {b for _, _, b in requeued if b} | {b for _, b, _ in given_up if b}
    for batch_id in batches:
        rt.redis.publish(BATCH_PROGRESS_CHANNEL, batch_id)


def die(rt: Runtime, exc: BaseException) -> NoReturn:
    """The engine is dead: hand back every job of this worker and exit for a supervisor."""
    with _dying:
        log.critical("engine dead (%s); handing back jobs and exiting", exc)
        metrics.engine_error()
        try:
            hand_back(rt, "The engine of the worker running this request stopped.")
        except Exception:
            log.exception("could not hand back jobs; the reconciler will")
        kill_engine_processes()
        os._exit(3)


class CancelListener(threading.Thread):
    """Aborts the jobs the API cancels, if they run in this worker."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(name="cancel-listener", daemon=True)
        self.rt = rt

    def run(self) -> None:
        while True:
            try:
                pubsub = self.rt.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(JOB_CANCEL_CHANNEL)
                for message in pubsub.listen():
                    if message["type"] == "message" and self.rt.cancel(message["data"].decode()):
                        log.info("aborted job %s", message["data"].decode())
            except redis.RedisError as exc:
                log.warning("cancel notifications lost (%s); resubscribing", exc)
                threading.Event().wait(1)
