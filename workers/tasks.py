"""Celery tasks: thin, by id, idempotent. The engine host does the work."""

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from core.errors import CancelledError, EngineError, FerryError
from core.queue import (
    BATCH_PROGRESS_CHANNEL,
    BATCH_TASK,
    CHAT_COMPLETION_TASK,
    JOB_CANCEL_CHANNEL,
    JOB_DONE_CHANNEL,
    STREAM_TTL_SECONDS,
    make_celery,
)
from core.queue import stream_key as job_stream_key
from core.settings import WorkerSettings
from workers import jobs, shaping
from workers.engine import EngineDead, EngineHost, kill_engine_processes

log = logging.getLogger(__name__)

app = make_celery(WorkerSettings(), "ferry-worker")


@dataclass
class Runtime:
    """What tasks use; set once by the worker before it consumes."""

    worker_id: str
    model: str
    system_fingerprint: str
    engine: EngineHost
    sessions: sessionmaker[Session]
    redis: redis.Redis
    # Used only on the engine's loop: stream chunks are written from there.
    stream_redis: aioredis.Redis
    # Jobs in the engine now, by id: cancelling one's future aborts it.
    inflight: dict[str, concurrent.futures.Future] = field(default_factory=dict)

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
    key = job_stream_key(job_id)
    assembler = shaping.StreamAssembler(answering)
    markup = shaping.ToolMarkupFilter() if fields.get("tools") else None
    try:
        async for raw in rt.engine.stream(job_id, fields):
            if markup is not None:
                markup(raw)
            assembler.add(raw)
            shaped = shaping.chunk(raw, answering)
            if shaped is not None:
                await rt.stream_redis.xadd(key, {"chunk": json.dumps(shaped)})
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            error: FerryError = CancelledError()
        elif isinstance(exc, FerryError):
            error = exc
        else:
            error = EngineError(f"The engine failed: {exc}")
        await end_stream(
            rt, key, {"error": json.dumps(error.envelope()), "status": error.status_code}
        )
        raise
    return assembler.completion()


async def end_stream(rt: Runtime, key: str, entry: dict[Any, Any]) -> None:
    """The last entry of a job's stream; the stream expires a while later."""
    async with rt.stream_redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, entry)
        pipe.expire(key, STREAM_TTL_SECONDS)
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
    claimed = jobs.claim(rt.sessions, job_id, rt.worker_id)
    if claimed is None:
        log.info("job %s has already ended; skipping", job_id)
        return
    body = claimed.request
    stream = bool(body.get("stream"))
    answering = _answering(rt, claimed)
    fields = shaping.engine_fields(body, stream)
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
        response = result if stream else shaping.completion(result, answering)
        jobs.succeed(rt.sessions, job_id, response)
        if stream:
            # After the result is stored: a client that sees the end can read it back at once.
            rt.engine.run(end_stream(rt, job_stream_key(job_id), {"done": "1"}))
    except concurrent.futures.CancelledError:
        log.info("job %s cancelled", job_id)
    except EngineDead as exc:
        log.critical("engine dead while running job %s: %s; exiting", job_id, exc)
        error = EngineError(f"The engine stopped while running this request: {exc}")
        jobs.fail(rt.sessions, job_id, error.status_code, error.envelope())
        rt.redis.publish(JOB_DONE_CHANNEL, job_id)
        # The process is no use without its engine: exit so that a supervisor restarts it.
        kill_engine_processes()
        os._exit(3)
    except FerryError as exc:
        jobs.fail(rt.sessions, job_id, exc.status_code, exc.envelope())
    except Exception as exc:
        log.exception("job %s failed", job_id)
        error = EngineError(f"The engine failed on this request: {exc}")
        jobs.fail(rt.sessions, job_id, error.status_code, error.envelope())
    rt.redis.publish(JOB_DONE_CHANNEL, job_id)


# vLLM schedules lower values first: interactive requests (0) overtake batch work.
BATCH_PRIORITY = 10


@app.task(name=BATCH_TASK)
def chat_completion_batch(job_ids: list[str]) -> None:
    """Run a chunk of a batch's jobs together in the engine; store their results at once."""
    rt = _runtime
    assert rt is not None, "the worker has not installed its runtime"
    running: dict[str, tuple[shaping.Answering, concurrent.futures.Future]] = {}
    for claimed in jobs.claim_many(rt.sessions, job_ids, rt.worker_id):
        answering = _answering(rt, claimed)
        fields = {
            **shaping.engine_fields(claimed.request, stream=False),
            "priority": BATCH_PRIORITY,
        }
        future = rt.engine.submit(rt.engine.complete(claimed.id, fields))
        rt.inflight[claimed.id] = future
        running[claimed.id] = (answering, future)
    outcomes: list[tuple[str, dict[str, Any] | None, FerryError | None]] = []
    dead: EngineDead | None = None
    for job_id, (answering, future) in running.items():
        try:
            outcomes.append((job_id, shaping.completion(future.result(), answering), None))
        except concurrent.futures.CancelledError:
            pass
        except EngineDead as exc:
            dead = exc
            outcomes.append((job_id, None, EngineError(f"The engine stopped: {exc}")))
        except FerryError as exc:
            outcomes.append((job_id, None, exc))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            outcomes.append(
                (job_id, None, EngineError(f"The engine failed on this request: {exc}"))
            )
        finally:
            rt.inflight.pop(job_id, None)
    with rt.sessions.begin() as session:
        for job_id, response, error in outcomes:
            if response is not None:
                jobs.succeed_in(session, job_id, response)
            elif error is not None:
                jobs.fail_in(session, job_id, error.status_code, error.envelope())
    for batch_id in {a.batch_id for a, _ in running.values() if a.batch_id is not None}:
        rt.redis.publish(BATCH_PROGRESS_CHANNEL, batch_id)
    if dead is not None:
        log.critical("engine dead while running a batch chunk: %s; exiting", dead)
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
