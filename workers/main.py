"""A worker process: load the engine once, announce the model, then consume its queue."""

import contextlib
import logging
import os
import socket
import threading
import time

import redis
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from core.db import sync_engine, sync_sessions
from core.queue import WORKERS_KEY, WorkerBeat, queue_for
from core.settings import DEFAULT_MODEL, WorkerSettings
from core.tables import ServedModel
from workers import tasks
from workers.engine import EngineHost
from workers.model_prep import prepare_default_model

log = logging.getLogger(__name__)


def resolve_model_path(settings: WorkerSettings) -> str:
    """The folder to load: the given path, or the prepared default model."""
    if settings.model_path:
        return settings.model_path
    if settings.model != DEFAULT_MODEL:
        raise SystemExit(f"--model-path is required to serve {settings.model!r}")
    return str(prepare_default_model(settings.cache_dir))


def announce_model(sessions, model: str) -> None:
    """Record that this model is served: requests for it are accepted from now on."""
    with sessions.begin() as session:
        session.execute(
            insert(ServedModel)
            .values(name=model)
            .on_conflict_do_update(
                index_elements=[ServedModel.name], set_={"last_served_at": func.now()}
            )
        )


class Heartbeat(threading.Thread):
    """Tells the API this worker lives; stops beating when the engine dies."""

    def __init__(self, client: redis.Redis, beat: WorkerBeat, every: float, engine: EngineHost):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.beat, self.every, self.engine = client, beat, every, engine
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and not self.engine.dead.is_set():
            self.beat.seen_at = time.time()
            try:
                self.client.hset(WORKERS_KEY, self.beat.worker_id, self.beat.dumps())
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stopped.wait(self.every)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):
            self.client.hdel(WORKERS_KEY, self.beat.worker_id)


def run(settings: WorkerSettings, loglevel: str = "INFO") -> None:
    """Start the engine, then serve the model's queue in the foreground until stopped."""
    model_path = resolve_model_path(settings)
    hostname = socket.gethostname()
    worker_id = f"{settings.model}@{hostname}-{os.getpid()}"
    log.info("worker %s: loading %s from %s", worker_id, settings.model, model_path)

    engine = EngineHost(settings, model_path)
    engine.start()
    db = sync_engine(settings.database_url, pool_size=8)
    sessions = sync_sessions(db)
    client = redis.Redis.from_url(settings.redis_url)
    announce_model(sessions, settings.model)
    tasks.install(
        tasks.Runtime(
            worker_id=worker_id,
            model=settings.model,
            engine=engine,
            sessions=sessions,
            redis=client,
        )
    )
    now = time.time()
    heartbeat = Heartbeat(
        client,
        WorkerBeat(worker_id, settings.model, hostname, os.getpid(), now, now),
        settings.heartbeat_seconds,
        engine,
    )
    heartbeat.start()
    app = tasks.app
    app.conf.broker_url = settings.redis_url
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.max_num_seqs}",
                f"--queues={queue_for(settings.model)}",
                f"--hostname={worker_id}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        heartbeat.stop()
        engine.close()
        db.dispose()
