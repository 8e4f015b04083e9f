"""Batch work: chunks pulled from a model's batch queues while the engine has room for them, the
projects with work queued taking turns by weight (workers.fair_share)."""

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.exc import OperationalError

from core.bus import BatchChunk
from core.queue import BATCH_CHUNK, FORGET_IF_EMPTY, batch_projects_key, batch_queue_for
from workers import jobs, metrics, shaping
from workers.engine import EngineDead
from workers.fair_share import FairShare, Weights
from workers.handback import die
from workers.results import store_results
from workers.runtime import Runtime, answering_for, app

log = logging.getLogger(__name__)


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
        chunk.running[job.id] = (answering_for(rt, job), future)
    if on_job_end is not None:
        for job_id, (_, future) in chunk.running.items():
            future.add_done_callback(partial(_ended, on_job_end, chunk, job_id))
    return chunk


def _ended(
    on_job_end: Callable[[Chunk, str], None], chunk: Chunk, job_id: str, _future: Any
) -> None:
    on_job_end(chunk, job_id)


class BatchPuller(threading.Thread):
    """Pulls batch chunks from the model's batch queues while the engine has room for them.

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
        self.share = FairShare()
        self.weights = Weights(rt.sessions)
        self.idle = threading.Event()
        self.finisher = threading.Thread(target=self._finish, name="batch-finisher", daemon=True)

    def run(self) -> None:
        self.finisher.start()
        while True:
            try:
                with app.connection_for_read() as conn:
                    self._pull(conn.default_channel)
                return
            except Exception as exc:
                if self.rt.stopping.is_set() and self.chunks == 0:
                    self.idle.set()
                    return
                log.warning("batch queue unavailable (%s); reconnecting", exc)
                time.sleep(1)

    def _pull(self, channel: Any) -> None:
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
            turn = self._next_chunk(channel)
            if turn is None:
                self.rt.stopping.wait(0.1)
                continue
            project, weight, message = turn
            job_ids = BatchChunk.decode(message.decode()).job_ids
            self.share.took(project, len(job_ids), weight)
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

    def _next_chunk(self, channel: Any) -> tuple[str, float, Any] | None:
        """The project next in turn that has a chunk queued, its weight and the chunk; None if
        no project has one."""
        model = self.rt.model
        key = batch_projects_key(model)
        with channel.conn_or_acquire() as client:
            queued = [p.decode() if isinstance(p, bytes) else p for p in client.smembers(key)]
        weights = self.weights.of(queued)
        for project in self.share.order(weights):
            queue = batch_queue_for(model, project)
            message = channel.basic_get(queue, no_ack=False)
            if message is not None:
                return project, weights[project], message
            with channel.conn_or_acquire() as client:
                client.eval(FORGET_IF_EMPTY, 2, queue, key, project)
        return None

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
                store_results(self.rt, [(j, *c.running[j]) for c, j in ended])
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
