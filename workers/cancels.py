"""Cancels sent by the API reach the jobs running in this worker's engine."""

import logging
import threading

import redis

from core.bus import JobCancel
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
                pubsub.subscribe(JobCancel.channel)
                for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    cancel = JobCancel.decode(message["data"])
                    if self.rt.cancel(cancel.job_id):
                        log.info("aborted job %s", cancel.job_id)
            except redis.RedisError as exc:
                log.warning("cancel notifications lost (%s); resubscribing", exc)
                threading.Event().wait(1)
