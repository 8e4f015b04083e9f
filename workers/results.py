"""Ended jobs' results and errors, stored many per transaction, tried again while Postgres is
away: a finished job's result is kept."""

import concurrent.futures
import contextlib
import logging
import time
from typing import Any

import redis
from sqlalchemy.exc import OperationalError

from core import logs
from core.bus import BatchProgress, publish
from core.errors import EngineError, FerryError
from workers import jobs, metrics, shaping
from workers.engine import EngineDead
from workers.handback import die
from workers.runtime import ENGINE_FAILED, Runtime

log = logging.getLogger(__name__)


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


def store_results(
    rt: Runtime, ended: list[tuple[str, shaping.Answering, concurrent.futures.Future]]
) -> None:
    """Store the results of ended batch jobs (id, labelling, the engine's future) in one
    transaction, and say so to the API."""
    outcomes: list[jobs.Outcome] = []
    dead: EngineDead | None = None
    batches: set[str] = set()
    for job_id, answering, future in ended:
        rt.ended(job_id)
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
    store_outcomes(rt, outcomes)
    if dead is not None:
        die(rt, dead)
    with contextlib.suppress(redis.RedisError):
        for batch_id in batches:
            publish(rt.redis, BatchProgress(batch_id))


def store_outcomes(rt: Runtime, outcomes: list[jobs.Outcome]) -> int:
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
