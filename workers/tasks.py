"""Celery tasks: thin, by id, idempotent. The engine host does the work."""

import logging
import os
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from core.errors import EngineError, FerryError
from core.queue import CHAT_COMPLETION_TASK, JOB_DONE_CHANNEL, make_celery
from core.settings import WorkerSettings
from core.wire import ChatCompletion
from workers import jobs
from workers.engine import EngineDead, EngineHost, kill_engine_processes

log = logging.getLogger(__name__)

app = make_celery(WorkerSettings(), "ferry-worker")


@dataclass
class Runtime:
    """What tasks use; set once by the worker before it consumes."""

    worker_id: str
    model: str
    engine: EngineHost
    sessions: sessionmaker[Session]
    redis: redis.Redis


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def completion_body(claimed: jobs.ClaimedJob, raw: dict[str, Any]) -> dict[str, Any]:
    """vLLM's response in OpenAI's shape, under the job's id, model and creation time."""
    completion = ChatCompletion.model_validate(raw)
    completion.id = claimed.id
    completion.model = claimed.model
    completion.created = claimed.created
    completion.metadata = claimed.metadata
    completion.service_tier = claimed.request.get("service_tier") or "default"
    return completion.model_dump(mode="json")


@app.task(name=CHAT_COMPLETION_TASK)
def chat_completion(job_id: str) -> None:
    """Run one chat completion job to its end."""
    rt = _runtime
    assert rt is not None, "the worker has not installed its runtime"
    claimed = jobs.claim(rt.sessions, job_id, rt.worker_id)
    if claimed is None:
        log.info("job %s has already ended; skipping", job_id)
        return
    try:
        raw = rt.engine.chat_completion(job_id, claimed.request)
        jobs.succeed(rt.sessions, job_id, completion_body(claimed, raw))
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
