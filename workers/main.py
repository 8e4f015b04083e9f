"""A worker process: load the engine once, announce the model, then consume its queue."""

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from celery.signals import worker_shutting_down
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from core.db import sync_engine, sync_sessions
from core.queue import BATCH_CHUNK, LOOKUPS_CHANGED_CHANNEL, WORKERS_KEY, WorkerBeat, queue_for
from core.settings import DEFAULT_MODEL, WorkerSettings
from core.tables import ServedModel
from workers import metrics, tasks
from workers.engine import EngineHost, LoopHost, engine_argv
from workers.fake_engine import FakeEngineHost
from workers.model_prep import default_model_dir, prepare_default_model

log = logging.getLogger(__name__)


# The default model's own template renders no tools; Ferry ships one in the format SmolLM2 was
# trained on, whose answers vLLM's xlam parser reads.
DEFAULT_MODEL_TEMPLATE = Path(__file__).parent / "templates" / "smollm2-tools.jinja"
DEFAULT_MODEL_TOOL_PARSER = "xlam"


def resolve_model(settings: WorkerSettings) -> tuple[WorkerSettings, str]:
    """The settings completed for the model, and the folder to load."""
    path = settings.model_path
    if not path:
        if settings.model != DEFAULT_MODEL:
            raise SystemExit(f"--model-path is required to serve {settings.model!r}")
        path = str(prepare_default_model(settings.cache_dir))
    if Path(path).resolve() == default_model_dir(settings.cache_dir).resolve():
        settings = settings.model_copy(
            update={
                "chat_template": settings.chat_template or str(DEFAULT_MODEL_TEMPLATE),
                "tool_call_parser": settings.tool_call_parser or DEFAULT_MODEL_TOOL_PARSER,
            }
        )
    return settings, path


def system_fingerprint(settings: WorkerSettings, model_path: str) -> str:
    """Names the model's files and the engine's settings: it changes when either does."""
    import vllm

    digest = hashlib.sha256()
    digest.update(f"vllm {vllm.__version__}\n".encode())
    digest.update(" ".join(engine_argv(settings, model_path)[2:]).encode())
    folder = Path(model_path)
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.suffix in (".json", ".jinja", ".txt", ".model"):
            digest.update(path.name.encode() + path.read_bytes())
        elif path.is_file():
            digest.update(f"{path.name} {path.stat().st_size}".encode())
    return "fp_" + digest.hexdigest()[:10]


def announce_model(
    sessions, client: redis.Redis, settings: WorkerSettings, fingerprint: str
) -> None:
    """Record that this model is served: requests for it are accepted from now on."""
    values = {"capabilities": settings.capabilities, "system_fingerprint": fingerprint}
    with sessions.begin() as session:
        session.execute(
            insert(ServedModel)
            .values(name=settings.model, **values)
            .on_conflict_do_update(
                index_elements=[ServedModel.name], set_={"last_served_at": func.now(), **values}
            )
        )
    with contextlib.suppress(redis.RedisError):
        client.publish(LOOKUPS_CHANGED_CHANNEL, settings.model)


class Heartbeat(threading.Thread):
    """Tells the API this worker lives; stops beating when the engine dies."""

    def __init__(self, client: redis.Redis, beat: WorkerBeat, every: float, engine: LoopHost):
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


def open_engine(settings: WorkerSettings) -> tuple[LoopHost, str]:
    """The worker's engine, started, and its system fingerprint."""
    if settings.engine == "fake":
        fake = FakeEngineHost(settings, "")
        fake.start()
        return fake, "fp_fake"
    settings, model_path = resolve_model(settings)
    log.info("loading %s from %s", settings.model, model_path)
    engine = EngineHost(settings, model_path)
    engine.start()
    return engine, system_fingerprint(settings, model_path)


def run(settings: WorkerSettings, loglevel: str = "INFO") -> None:
    """Start the engine, then serve the model's queue in the foreground until stopped.

    On SIGTERM: take no more jobs, let those in flight finish for up to
    shutdown_timeout_seconds, hand the rest back to the queue, then exit.
    """
    hostname = socket.gethostname()
    worker_id = f"{settings.model}@{hostname}-{os.getpid()}"
    engine, fingerprint = open_engine(settings)
    db = sync_engine(settings.database_url, pool_size=8)
    sessions = sync_sessions(db)
    client = redis.Redis.from_url(settings.redis_url)
    announce_model(sessions, client, settings, fingerprint)
    runtime = tasks.Runtime(
        worker_id=worker_id,
        model=settings.model,
        system_fingerprint=fingerprint,
        engine=engine,
        sessions=sessions,
        redis=client,
        stream_redis=aioredis.Redis.from_url(settings.redis_url),
        max_attempts=settings.max_attempts,
    )
    tasks.install(runtime)
    tasks.CancelListener(runtime).start()
    # Enough batch jobs to fill the engine, and one chunk more waiting in it.
    puller = tasks.BatchPuller(runtime, settings.max_num_seqs + BATCH_CHUNK)
    puller.start()
    stop = Shutdown(runtime, settings.shutdown_timeout_seconds)
    worker_shutting_down.connect(stop.begin, weak=False)
    now = time.time()
    heartbeat = Heartbeat(
        client,
        WorkerBeat(worker_id, settings.model, hostname, os.getpid(), now, now),
        settings.heartbeat_seconds,
        engine,
    )
    heartbeat.start()
    metrics.serve(settings.metrics_port, model=settings.model, worker_id=worker_id)
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
        stop.begin()
        stop.drain(puller)
        heartbeat.stop()
        engine.close()
        db.dispose()


class Shutdown:
    """The worker's way out: finish what is in flight within a timeout, hand back the rest."""

    def __init__(self, rt: tasks.Runtime, timeout: float) -> None:
        self.rt = rt
        self.timeout = timeout
        self.deadline: float | None = None
        self.drained = threading.Event()

    def begin(self, **_: object) -> None:
        """Called on SIGTERM (Celery's warm shutdown) or when the consumer stops."""
        if self.deadline is not None:
            return
        log.info("shutting down: finishing jobs in flight for up to %g s", self.timeout)
        self.deadline = time.monotonic() + self.timeout
        self.rt.stopping.set()
        threading.Thread(target=self._guard, name="shutdown-guard", daemon=True).start()

    def _guard(self) -> None:
        """Celery waits for its task threads without a limit: past the deadline, hand back."""
        assert self.deadline is not None
        if self.drained.wait(max(0.0, self.deadline - time.monotonic()) + 1):
            return
        self._hand_back()
        os._exit(0)

    def drain(self, puller: tasks.BatchPuller) -> None:
        """Wait for batch chunks in flight until the deadline; hand back what is left."""
        assert self.deadline is not None
        puller.idle.wait(max(0.0, self.deadline - time.monotonic()))
        if self.rt.inflight or not puller.idle.is_set():
            self._hand_back()
        self.drained.set()

    def _hand_back(self) -> None:
        try:
            tasks.hand_back(self.rt, "The worker running this request shut down.")
        except Exception:
            log.exception("could not hand back jobs; the reconciler will")
