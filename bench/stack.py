"""Start a local Ferry stack (an API and workers, as `ferry` subprocesses) for tests and benches.

Postgres and Redis must already run (`make services`). Each stack gets its own database and
Redis database number, so it never touches the data of `make run`.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
FERRY = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, what: str, timeout: float) -> None:
    """Block until `url` answers 200; fail if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start; see test-artifacts/")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {timeout:g} s")


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` to its end, in a process of its own, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def run_for_json(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -m module args` to its end (in a process of its own, so that each engine
    starts fresh); the last line it printed that is a JSON object. RuntimeError if none."""
    done = run_module(module, *args, env=env)
    found = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not found:
        raise RuntimeError(
            f"{module} {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}"
        )
    return json.loads(found[-1])


def descendants(pid: int) -> list:
    """The processes `pid` started, and theirs (psutil.Process objects)."""
    import psutil

    return psutil.Process(pid).children(recursive=True)


def wait_gone(processes: list, timeout: float) -> list:
    """Wait until `processes` have ended (zombies count as ended); those still running."""
    import psutil

    def running(proc) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (left := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@dataclass
class Stack:
    database: str = "ferry_test"
    redis_db: int = 15
    port: int = field(default_factory=free_port)
    log_dir: Path = ROOT / "test-artifacts"
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    # Each worker's Prometheus port, by its name in start_worker.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:6379/{self.redis_db}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **more: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FERRY_DATABASE_URL=self.database_url,
            FERRY_REDIS_URL=self.redis_url,
            PYTHONUNBUFFERED="1",
            # Webhook secrets are sealed with it; the tests' receivers listen on loopback.
            FERRY_SECRET_KEY="ferry-test-stack-secret-key",
            FERRY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8,::1/128",
        )
        env.update(self.extra_env)
        env.update(more)
        return env

    def ferry(self, *args: str) -> str:
        """Run a `ferry` command to its end; its standard output."""
        done = subprocess.run(
            [*FERRY, *args], env=self.env(), cwd=ROOT, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"ferry {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def reset(self) -> None:
        """A fresh database migrated to head, and an empty Redis database."""
        import redis

        self.drop_database()
        redis.Redis.from_url(self.redis_url).flushdb()
        self.ferry("db", "upgrade")

    def drop_database(self) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        admin = create_engine(
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
        )
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        admin.dispose()

    def create_key(self, name: str = "test", project: str = "default") -> str:
        return self.ferry("keys", "create", name, "--project", project).strip().splitlines()[-1]

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        # A session of its own: killing its group takes the engine's processes with it.
        proc = subprocess.Popen(
            [*FERRY, *args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def start_api(self, **env: str) -> subprocess.Popen:
        return self.start_api_on(self.port, "api", **env)

    def start_api_on(self, port: int, name: str, **env: str) -> subprocess.Popen:
        """Start an API process on `port` (its log: `name`.log) serving this stack's data."""
        proc = self._spawn(
            name, ["api", "--port", str(port), "--log-level", "WARNING"], self.env(**env)
        )
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, f"the API ({name})", timeout=60)
        return proc

    def start_worker(self, name: str = "worker", *args: str, **env: str) -> subprocess.Popen:
        """Start a worker with the shipped engine settings, but for what `env` sets; it takes
        requests once `wait_for_workers` says so."""
        # Workers on one host each need a metrics port of their own.
        env = {"FERRY_METRICS_PORT": str(free_port()), **env}
        self.metrics_ports[name] = int(env["FERRY_METRICS_PORT"])
        return self._spawn(name, ["worker", *args], self.env(**env))

    def wait_for_workers(self, count: int = 1, timeout: float = 300) -> None:
        """Block until `count` of this stack's running workers beat in Redis."""
        import redis

        from core.queue import WORKERS_KEY, live_beats

        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = {p.pid for p in self.processes if p.poll() is None}
            live, _ = live_beats(client.hgetall(WORKERS_KEY), ttl=15)
            if len([beat for beat in live if beat.pid in running]) >= count:
                return
            for proc in self.processes:
                # Not counting workers stopped (0), killed (-9) or left by their engine (3).
                exited = proc.poll() not in (None, 0, -9, 3)
                if exited and proc.args[len(FERRY)] == "worker":
                    raise RuntimeError("a worker exited at start; see test-artifacts/*.log")
            time.sleep(0.5)
        raise RuntimeError(f"{count} worker(s) did not come up within {timeout:g} s")

    def worker_process(self, worker_id: str) -> subprocess.Popen:
        """The process of a worker, by the id it records on the jobs it runs."""
        pid = int(worker_id.rsplit("-", 1)[1])
        return next(p for p in self.processes if p.pid == pid)

    def kill(self, proc: subprocess.Popen) -> None:
        """kill -9 a process and everything it started, as a crashed host would."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, timeout: float = 30) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(proc)
        self.processes.clear()


@contextlib.contextmanager
def running_stack(**kwargs) -> Iterator[Stack]:
    """A reset stack with an API and one worker, stopped on exit."""
    stack = Stack(**kwargs)
    stack.reset()
    try:
        stack.start_worker()
        stack.start_api()
        stack.wait_for_workers()
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def scratch_database(database: str, redis_db: int) -> Iterator[tuple["Stack", Any, str]]:
    """A reset stack with nothing started, an engine on its database, and a key "bench"; on
    exit, whatever was started is stopped and the database dropped."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    stack = Stack(database=database, redis_db=redis_db)
    stack.reset()
    engine = create_engine(stack.database_url, poolclass=NullPool)
    try:
        yield stack, engine, stack.create_key("bench")
    finally:
        stack.stop()
        engine.dispose()
        stack.drop_database()


def batch_line(custom_id: str, model: str, content: str, max_tokens: int = 8) -> dict:
    """A batch input line asking `model` one chat completion."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        },
    }


FINAL_BATCH_STATES = ("completed", "failed", "expired", "cancelled")


def run_batch(client, lines: list[dict], poll: float = 0.2, timeout: float = 3600):
    """Upload `lines` as a batch input file and run it to its end through the API.

    Returns the final batch and the seconds from `batches.create` until it ended.
    """
    import io
    import json

    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while (batch := client.batches.retrieve(batch.id)).status not in FINAL_BATCH_STATES:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"batch {batch.id} still {batch.status} after {timeout:g} s")
        time.sleep(poll)
    return batch, time.perf_counter() - started
