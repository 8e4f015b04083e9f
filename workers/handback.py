"""Jobs a worker cannot finish go back to the queue: on shutdown, and when its engine dies (the
worker then exits for a supervisor). Jobs past their attempts fail instead."""

import logging
import os
import threading
from typing import NoReturn

from core import handback
from core.queue import dispatch
from workers import metrics
from workers.engine import kill_engine_processes
from workers.runtime import Runtime, app

log = logging.getLogger(__name__)

_dying = threading.Lock()


def hand_back(rt: Runtime, reason: str) -> None:
    """Give this worker's running jobs back to the queue (or fail those that cannot run again)."""
    give_up, requeue = handback.statements(
        handback.running_on([rt.worker_id]), rt.max_attempts, reason
    )
    with rt.sessions.begin() as session:
        lost = handback.Lost(session.execute(give_up).all(), session.execute(requeue).all(), reason)
    log.warning(
        "handed back %d jobs, failed %d: %s", len(lost.requeued), len(lost.given_up), reason
    )
    dispatch(app, rt.sessions, lost.to_send())
    with rt.redis.pipeline(transaction=False) as pipe:
        lost.tell(pipe)
        pipe.execute()


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
