"""Cancels sent by the API reach the jobs running in this worker's engine."""

import logging
import threading

import redis

from core.queue import JOB_CANCEL_CHANNEL
from workers.runtime import Runtime

log = logging.getLogger(__name__)


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
