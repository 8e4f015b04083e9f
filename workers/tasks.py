"""Celery tasks: thin, by id, idempotent. The engine host does the work."""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from core.errors import EngineError, FerryError
from core.queue import CHAT_COMPLETION_TASK, JOB_DONE_CHANNEL, STREAM_TTL_SECONDS, make_celery
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
        error = exc if isinstance(exc, FerryError) else EngineError(f"The engine failed: {exc}")
        await _end_stream(
            rt, key, {"error": json.dumps(error.envelope()), "status": error.status_code}
        )
        raise
    await _end_stream(rt, key, {"done": "1"})
    return assembler.completion()


async def _end_stream(rt: Runtime, key: str, entry: dict[Any, Any]) -> None:
    async with rt.stream_redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, entry)
        pipe.expire(key, STREAM_TTL_SECONDS)
        await pipe.execute()


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
    answering = shaping.Answering.for_request(
        body,
        id=claimed.id,
        model=claimed.model,
        created=claimed.created,
        system_fingerprint=rt.system_fingerprint,
        metadata=claimed.metadata,
    )
    fields = shaping.engine_fields(body, stream)
    try:
        if stream:
            response = rt.engine.run(relay_stream(rt, job_id, fields, answering))
        else:
            raw = rt.engine.run(rt.engine.complete(job_id, fields))
            response = shaping.completion(raw, answering)
        jobs.succeed(rt.sessions, job_id, response)
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
