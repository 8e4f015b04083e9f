"""Celery tasks: thin, by id, idempotent. The engine host does the work."""

import concurrent.futures
import logging

from core import logs
from core.bus import JobDone, StreamDone, publish
from core.errors import EngineError, FerryError
from core.queue import CHAT_COMPLETION_TASK
from workers import jobs, metrics, shaping
from workers.engine import EngineDead
from workers.handback import die
from workers.results import store_outcomes
from workers.runtime import ENGINE_FAILED, answering_for, app, current
from workers.streams import relay_stream, write_stream

log = logging.getLogger(__name__)


@app.task(name=CHAT_COMPLETION_TASK)
def chat_completion(job_id: str) -> None:
    """Run one chat completion job to its end."""
    rt = current()
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
    answering = answering_for(rt, claimed)
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
            rt.ended(job_id)
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
    stored = store_outcomes(rt, [outcome]) if outcome is not None else 0
    if stream and outcome is not None and outcome.response is not None:
        # After the result is stored: a client that sees the end can read it back at once.
        rt.engine.run(write_stream(rt, job_id, StreamDone()))
    # What was stored goes with the notification, so the waiting API need not read it back;
    # not for a stream (its client has read the chunks) nor a job that had ended otherwise.
    sent = outcome.sent() if stored and outcome is not None and not stream else None
    publish(rt.redis, JobDone(job_id, sent))
