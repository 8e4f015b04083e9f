"""A worker process: load the engine once, announce the model, then consume its queue."""

import contextlib
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis
from celery.signals import worker_shutting_down
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from core.bus import LookupsChanged, publish
from core.db import sync_engine, sync_sessions
from core.queue import (
    BATCH_CHUNK,
    FAILED_CHECKS_KEY,
    WORKERS_KEY,
    FailedCheck,
    WorkerBeat,
    queue_for,
)
from core.settings import DEFAULT_MODEL, WorkerSettings
from core.tables import ServedModel
from workers import handback, metrics, runtime, self_check, tasks
from workers.batch_puller import BatchPuller
from workers.cancels import CancelListener
from workers.engine import (
    EngineHost,
    EngineSettingsError,
    LoopHost,
    engine_argv,
    with_platform_defaults,
)
from workers.fake_engine import FakeEngineHost
from workers.model_prep import default_model_dir, prepare_default_model

log = logging.getLogger(__name__)


# The default model's own template renders no tools; Ferry ships one in the format SmolLM2 was
# trained on, whose answers vLLM's xlam parser reads.
DEFAULT_MODEL_TEMPLATE = Path(__file__).parent / "templates" / "smollm2-tools.jinja"
DEFAULT_MODEL_TOOL_PARSER = "xlam"


def resolve_model(settings: WorkerSettings) -> tuple[WorkerSettings, str]:
    """The settings completed for the model and the platform, and the folder to load."""
    settings = with_platform_defaults(settings)
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
    values = {
        "capabilities": settings.capabilities,
        "system_fingerprint": fingerprint,
        "max_model_len": settings.max_model_len,
    }
    with sessions.begin() as session:
        session.execute(
            insert(ServedModel)
            .values(name=settings.model, **values)
            .on_conflict_do_update(
                index_elements=[ServedModel.name], set_={"last_served_at": func.now(), **values}
            )
        )
    with contextlib.suppress(redis.RedisError):
        publish(client, LookupsChanged(settings.model))


def record_failed_check(
    client: redis.Redis, settings: WorkerSettings, worker_id: str, hostname: str
) -> None:
    """Leave the failure where the dashboard shows it (for FAILED_CHECK_TTL_SECONDS)."""
    failure = FailedCheck(worker_id, settings.model, hostname, time.time())
    with contextlib.suppress(redis.RedisError):
        client.hset(FAILED_CHECKS_KEY, worker_id, failure.dumps())


class Heartbeat(threading.Thread):
    """Tells the API this worker lives, and whether it is idle; stops beating when the engine
    dies."""

    def __init__(self, client: redis.Redis, beat: WorkerBeat, every: float, rt: runtime.Runtime):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.beat, self.every, self.rt = client, beat, every, rt
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and not self.rt.engine.dead.is_set():
            self.beat.seen_at = time.time()
            if self.rt.inflight or self.rt.stopping.is_set():
                self.beat.idle_since = None
            else:
                since = self.beat.idle_since or self.beat.seen_at
                self.beat.idle_since = max(since, self.rt.last_ended)
            try:
                self.client.hset(WORKERS_KEY, self.beat.worker_id, self.beat.dumps())
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stopped.wait(self.every)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):
            self.client.hdel(WORKERS_KEY, self.beat.worker_id)


@dataclass
class Opened:
    """A worker's engine, started, with what it was started with."""

    engine: LoopHost
    settings: WorkerSettings
    fingerprint: str
    checks: tuple[self_check.Check, ...]


def open_engine(settings: WorkerSettings) -> Opened:
    """The worker's engine, started, and the known answers it must give."""
    if settings.engine == "fake":
        fake = FakeEngineHost(settings, "")
        fake.start()
        return Opened(fake, settings, "fp_fake", ())
    settings, model_path = resolve_model(settings)
    default_model = Path(model_path).resolve() == default_model_dir(settings.cache_dir).resolve()
    try:
        # A bad checks file is found before minutes go into loading.
        checks = self_check.checks_for(settings, default_model) if settings.self_check else ()
        mode = "eager" if settings.enforce_eager else "compiled"
        log.info(
            "loading %s from %s (dtype %s, %s)", settings.model, model_path, settings.dtype, mode
        )
        engine = EngineHost(settings, model_path)
        engine.start()
    except (EngineSettingsError, self_check.ChecksFileError) as exc:
        log.critical("settings refused: %s", exc)
        print(
            f"The worker's settings are refused: {exc}\n(vLLM's arguments come from the worker's "
            f"options and FERRY_ settings; FERRY_ENGINE_ARGS is {settings.engine_args!r}.)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(self_check.EXIT_BAD_SETTINGS) from exc
    return Opened(engine, settings, system_fingerprint(settings, model_path), checks)


def check_engine(opened: Opened) -> self_check.Result | None:
    """Run the known-answer check; None when there is none to run.

    A failed check closes the engine and raises SystemExit with EXIT_SELF_CHECK_FAILED, after
    printing what failed and the setting to change.
    """
    settings = opened.settings
    if not opened.checks:
        if settings.engine == "vllm":
            log.warning(
                "no self-check for %s: %s",
                settings.model,
                "FERRY_SELF_CHECK is off"
                if not settings.self_check
                else "set FERRY_SELF_CHECK_FILE to known answers of this model",
            )
        return None
    result = self_check.run(opened.engine, settings.model, opened.checks)
    metrics.self_check_done(result.passed, result.seconds)
    if result.passed:
        log.info("%s", result.summary())
        return result
    log.critical("%s", result.summary())
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu() if settings.engine == "vllm" else False
    print(self_check.explain(result, settings, on_cpu), file=sys.stderr, flush=True)
    opened.engine.close()
    raise SystemExit(self_check.EXIT_SELF_CHECK_FAILED)


def self_check_only(settings: WorkerSettings) -> None:
    """`ferry worker --self-check`: load the engine, run the check, print its result, stop."""
    opened = open_engine(settings)
    try:
        result = check_engine(opened)
    finally:
        opened.engine.close()
    if result is None:
        raise SystemExit(f"no self-check to run for {opened.settings.model}")
    print(result.summary(), flush=True)


def run(settings: WorkerSettings, loglevel: str = "INFO") -> None:
    """Start the engine, then serve the model's queue in the foreground until stopped.

    On SIGTERM: take no more jobs, let those in flight finish for up to
    shutdown_timeout_seconds, hand the rest back to the queue, then exit.
    """
    hostname = socket.gethostname()
    worker_id = f"{settings.model}@{hostname}-{os.getpid()}"
    opened = open_engine(settings)
    engine, fingerprint, settings = opened.engine, opened.fingerprint, opened.settings
    client = redis.Redis.from_url(settings.redis_url)
    try:
        checked = check_engine(opened)
    except SystemExit:
        record_failed_check(client, settings, worker_id, hostname)
        raise
    db = sync_engine(settings.database_url, pool_size=8)
    sessions = sync_sessions(db)
    announce_model(sessions, client, settings, fingerprint)
    rt = runtime.Runtime(
        worker_id=worker_id,
        model=settings.model,
        system_fingerprint=fingerprint,
        engine=engine,
        sessions=sessions,
        redis=client,
        stream_redis=aioredis.Redis.from_url(settings.redis_url),
        max_attempts=settings.max_attempts,
    )
    runtime.install(rt)
    CancelListener(rt).start()
    # Enough batch jobs to fill the engine, and one chunk more waiting in it.
    puller = BatchPuller(rt, settings.max_num_seqs + BATCH_CHUNK)
    puller.start()
    stop = Shutdown(rt, settings.shutdown_timeout_seconds)
    worker_shutting_down.connect(stop.begin, weak=False)
    now = time.time()
    heartbeat = Heartbeat(
        client,
        WorkerBeat(
            worker_id,
            settings.model,
            hostname,
            os.getpid(),
            now,
            now,
            self_check=checked.summary() if checked else "not run",
        ),
        settings.heartbeat_seconds,
        rt,
    )
    heartbeat.start()
    metrics.serve(
        settings.metrics_port,
        model=settings.model,
        worker_id=worker_id,
        host=settings.metrics_host,
    )
    app = tasks.app  # importing `tasks` registers them with it
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

    def __init__(self, rt: runtime.Runtime, timeout: float) -> None:
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

    def drain(self, puller: BatchPuller) -> None:
        """Wait for batch chunks in flight until the deadline; hand back what is left."""
        assert self.deadline is not None
        puller.idle.wait(max(0.0, self.deadline - time.monotonic()))
        if self.rt.inflight or not puller.idle.is_set():
            self._hand_back()
        self.drained.set()

    def _hand_back(self) -> None:
        try:
            handback.hand_back(self.rt, "The worker running this request shut down.")
        except Exception:
            log.exception("could not hand back jobs; the reconciler will")
