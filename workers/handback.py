"""Jobs a worker cannot finish go back to the queue: on shutdown, and when its engine dies (the
worker then exits for a supervisor). Jobs past their attempts fail instead."""

import contextlib
import json
import logging
import os
import threading
from typing import NoReturn

from core import handback
from core.queue import BATCH_PROGRESS_CHANNEL, JOB_DONE_CHANNEL, add_to_stream, send_jobs
from workers import metrics
from workers.engine import kill_engine_processes
from workers.runtime import Runtime, app

log = logging.getLogger(__name__)

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
