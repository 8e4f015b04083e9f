"""Faults on the real stack: whatever dies or restarts, every accepted job ends exactly once.

These run last (see conftest): they kill workers, restart Redis empty and stop Postgres. They
are about the repair timings, so they set them: the session's stack is started again with its
reconciler running every second with a 5 s grace, taking a worker silent for 6 s for dead, and
each fault is repaired within seconds rather than the shipped half minute.
"""

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from sqlalchemy import Engine, text

from bench.stack import ROOT, Stack, descendants, free_port, wait_gone
from core.queue import BATCH_CHUNK
from core.settings import WorkerSettings
from tests.conftest import MODEL
from tests.e2e.test_batches import line, read_jsonl, upload, wait_until
from workers.parent_watch import WORKER_PID_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

ESSAY = [{"role": "user", "content": "Write a very long essay about the sea."}]
COUNTING = [{"role": "user", "content": "Count from 1 to 2000, one number per line."}]
# More batch jobs than one worker takes in (max_num_seqs + a chunk, on the shipped settings): the
# batch must spread over two.
SPREAD = 2 * (WorkerSettings(_env_file=None).max_num_seqs + BATCH_CHUNK)
# The end-of-text tokens banned: the answer runs to max_tokens, outlasting a shutdown timeout.
NO_END = {"0": -100, "2": -100}
# The SIGTERM test's long answer: at least three times the shutdown timeout (below) on this
# machine's CPU engine (float32, two seqs on two shared cores: about 17 tokens/s).
LONG = 600


def lines(count: int, tag: str, max_tokens: int = 16) -> list[str]:
    return [
        line(f"{tag}-{i}", f"Say a word about {i}.", max_tokens=max_tokens) for i in range(count)
    ]


def start_batch(client: openai.OpenAI, count: int, tag: str, max_tokens: int = 16) -> str:
    file = upload(client, lines(count, tag, max_tokens))
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def poll(condition: Callable[[], object], seconds: float, what: str, every: float = 0.1) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := condition():
                return value
        time.sleep(every)
    raise AssertionError(f"not within {seconds:g} s: {what}")


def one(db: Engine, sql: str, **params: object):
    with db.connect() as conn:
        return conn.execute(text(sql), params).one()


def assert_exactly_once(client: openai.OpenAI, db: Engine, batch_id: str, count: int, tag: str):
    """The batch completed; each line is in the output once and only once; no job is open."""
    done = wait_until(client, batch_id, {"completed", "failed", "cancelled"}, seconds=300)
    assert done.status == "completed", done
    assert done.request_counts.total == count
    assert done.request_counts.completed == count and done.request_counts.failed == 0
    out = read_jsonl(client, done.output_file_id)
    seen = Counter(line["custom_id"] for line in out)
    assert seen == Counter(f"{tag}-{i}" for i in range(count))
    assert all(line["response"]["status_code"] == 200 for line in out)
    states = one(
        db,
        "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok, count(*) AS total"
        " FROM jobs WHERE batch_id = :b",
        b=batch_id,
    )
    assert states.ok == states.total == count
    return done


def alive(process: psutil.Process) -> str:
    """A process as a failure names it: name, parent, state, signals pending, the worker's mark."""
    with contextlib.suppress(psutil.Error, OSError):
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        pending = " ".join(line for line in status if line.startswith(("SigPnd", "ShdPnd")))
        mark = process.environ().get(WORKER_PID_ENV)
        return (
            f"{process.name()} (pid {process.pid}, ppid {process.ppid()}, {process.status()},"
            f" {pending}, {WORKER_PID_ENV}={mark})"
        )
    return f"pid {process.pid}"


def workers_of(db: Engine, batch_id: str) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT worker, count(*) FROM jobs WHERE batch_id = :b AND worker IS NOT NULL"
                " GROUP BY worker"
            ),
            {"b": batch_id},
        ).all()
    return {worker: n for worker, n in rows}


# The repair timings these tests run with (their subject, shortened so that a fault is repaired
# within a test's time); the rest of the suite runs the shipped ones. The SIGTERM test's long job
# must outlast the shutdown timeout on any host.
QUICK_REPAIRS = {
    "FERRY_RECONCILE_SECONDS": "1",
    "FERRY_REQUEUE_GRACE_SECONDS": "5",
    "FERRY_WORKER_TTL_SECONDS": "6",
    "FERRY_HEARTBEAT_SECONDS": "1",
    "FERRY_SHUTDOWN_TIMEOUT_SECONDS": "10",
}


@pytest.fixture(scope="module", autouse=True)
def quick_repairs(live_worker: Stack) -> Iterator[Stack]:
    """The session's API and worker started again with QUICK_REPAIRS, and so is every process
    these tests start; the shipped timings come back after them."""
    shipped = dict(live_worker.extra_env)

    def restart(env: dict[str, str]) -> None:
        live_worker.stop()
        live_worker.extra_env = env
        live_worker.start_worker()
        live_worker.start_api()
        live_worker.wait_for_workers(1)

    restart({**shipped, **QUICK_REPAIRS})
    yield live_worker
    restart(shipped)


def stop_postgres() -> None:
    """Stop this machine's Postgres (fast: open sessions are ended); services() starts it."""
    cluster = next(iter(sorted(p.name for p in Path("/etc/postgresql").iterdir())))
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "stop", "-m", "fast"],
        check=True,
        timeout=60,
    )


def services() -> None:
    subprocess.run([str(ROOT / "scripts" / "services.sh")], check=True, timeout=120)


@pytest.fixture(scope="module")
def second_worker(live_worker: Stack) -> subprocess.Popen:
    """A second worker for the suite's model, beside the session's."""
    proc = live_worker.start_worker("worker-2", FERRY_CPU_KV_CACHE_GIB="1")
    live_worker.wait_for_workers(2)
    return proc


def test_a_batch_spreads_over_two_workers_and_a_killed_one_loses_nothing(
    live_worker: Stack, second_worker: subprocess.Popen, client: openai.OpenAI, db: Engine
) -> None:
    stack = live_worker
    batch_id = start_batch(client, SPREAD, "spread", max_tokens=24)

    # Both workers pull chunks of the one batch (each holds at most max_num_seqs + one chunk).
    poll(lambda: len(workers_of(db, batch_id)) >= 2, 120, "two workers running the batch")

    # kill -9 the second worker (and its engine) once it has finished some jobs and runs others.
    victim = next(w for w in workers_of(db, batch_id) if str(second_worker.pid) in w)

    def midway() -> bool:
        row = one(
            db,
            "SELECT count(*) FILTER (WHERE status = 'succeeded') AS done,"
            " count(*) FILTER (WHERE status = 'running') AS running"
            " FROM jobs WHERE batch_id = :b AND worker = :w",
            b=batch_id,
            w=victim,
        )
        return row.done > 0 and row.running > 0

    poll(midway, 180, "the second worker midway through its jobs")
    # Its main process alone, as the OOM killer would: its engine must not outlive it.
    engine = descendants(second_worker.pid)
    assert any("EngineCore" in p.name() for p in engine), [p.name() for p in engine]
    second_worker.send_signal(signal.SIGKILL)
    second_worker.wait()
    left = wait_gone(engine, timeout=20)
    assert not left, f"engine processes outlived their worker: {[alive(p) for p in left]}"
    # A new worker takes the dead one's place.
    stack.start_worker("worker-3", FERRY_CPU_KV_CACHE_GIB="1")

    assert_exactly_once(client, db, batch_id, SPREAD, "spread")
    handed_back = one(
        db,
        "SELECT count(*) AS n FROM jobs WHERE batch_id = :b AND attempts = 2 AND worker <> :w",
        b=batch_id,
        w=victim,
    )
    assert handed_back.n > 0, "no job of the killed worker was run again elsewhere"
    stack.wait_for_workers(2)


def test_engine_death_ends_the_worker_and_its_job_runs_elsewhere(
    live_worker: Stack, client: openai.OpenAI, db: Engine
) -> None:
    stack = live_worker
    stack.wait_for_workers(2)
    answer: dict[str, object] = {}

    def ask() -> None:
        try:
            answer["completion"] = client.chat.completions.create(
                model=MODEL, messages=ESSAY, max_tokens=400, logit_bias=NO_END, store=True
            )
        except openai.APIError as exc:
            answer["error"] = exc

    asking = threading.Thread(target=ask)
    asking.start()
    running = poll(
        lambda: one(
            db,
            "SELECT id, worker FROM jobs WHERE status = 'running' AND request->'messages' = "
            "CAST(:m AS jsonb)",
            m=json.dumps(ESSAY),
        ),
        60,
        "the essay running",
    )
    job_id, doomed_id = running  # type: ignore[misc]
    doomed = stack.worker_process(doomed_id)
    cores = [
        p for p in psutil.Process(doomed.pid).children(recursive=True) if "EngineCore" in p.name()
    ]
    assert cores, "the worker has no engine core process"
    for core in cores:
        core.kill()

    # The worker exits (for a supervisor to restart it) ...
    assert doomed.wait(60) == 3
    # ... and its job runs again on the other worker; the waiting client gets its answer.
    asking.join(240)
    assert "error" not in answer, answer.get("error")
    completion = answer["completion"]
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.id == job_id and completion.choices[0].message.content
    job = one(db, "SELECT status, attempts, worker FROM jobs WHERE id = :j", j=job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.worker != doomed_id


def test_redis_restarted_empty_mid_batch_loses_nothing(
    live_worker: Stack, client: openai.OpenAI, db: Engine
) -> None:
    # A second worker again, for the tests after this one; it loads while Redis restarts.
    live_worker.start_worker("worker-4", FERRY_CPU_KV_CACHE_GIB="1")
    batch_id = start_batch(client, 120, "redis")
    poll(
        lambda: client.batches.retrieve(batch_id).request_counts.completed > 0,
        180,
        "some lines completed",
        every=0.5,
    )
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, timeout=30)
    time.sleep(2)
    services()  # starts Redis again, empty: every queued message and heartbeat is gone
    assert_exactly_once(client, db, batch_id, 120, "redis")
    live_worker.wait_for_workers(2)


def test_postgres_stopped_answers_503_then_recovers_and_loses_nothing(
    live_worker: Stack, client: openai.OpenAI, http: httpx.Client, db: Engine
) -> None:
    async_ids = []
    for i in range(6):
        response = http.post(
            "/v1/chat/completions",
            headers={"Prefer": "respond-async"},
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Name a colour ({i})."}],
                "max_tokens": 48,
                "store": True,
            },
        )
        assert response.status_code == 202
        async_ids.append(response.json()["id"])
    batch_id = start_batch(client, 40, "pg")
    poll(lambda: client.batches.retrieve(batch_id).status == "in_progress", 60, "batch running")

    stop_postgres()
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for method, path, payload in [
            ("POST", "/v1/chat/completions", body),
            ("GET", "/v1/chat/completions", None),
            ("GET", f"/v1/batches/{batch_id}", None),
        ]:
            started = time.monotonic()
            response = http.request(method, path, json=payload, timeout=30)
            assert time.monotonic() - started < 15, f"{method} {path} hung"
            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["message"]
        time.sleep(3)
    finally:
        services()

    # The API recovers by itself.
    poll(lambda: http.get("/v1/chat/completions").status_code == 200, 60, "the API recovered")
    assert_exactly_once(client, db, batch_id, 40, "pg")
    for job_id in async_ids:
        done = poll(
            lambda job_id=job_id: (
                http.get(f"/v1/chat/completions/{job_id}").json()["status"]
                in ("succeeded", "failed")
            ),
            180,
            f"job {job_id} ended",
            every=0.5,
        )
        assert done
        assert http.get(f"/v1/chat/completions/{job_id}").json()["status"] == "succeeded"


@pytest.mark.parametrize("sent", [False, True], ids=["never-sent", "sent-then-lost"])
def test_a_job_whose_message_never_reached_a_worker_is_run_by_the_reconciler(
    sent: bool, live_worker: Stack, api_key: str, http: httpx.Client, db: Engine
) -> None:
    """Never sent: what an API process that died between its commit and its send leaves. Sent
    and then lost, with no other traffic to show it: what a worker that took the message and
    died before claiming the job leaves (the suite's worker is idle, so the message is gone)."""
    assert api_key  # the suite's key, named "suite", owns the job
    job_id = f"chatcmpl-orphan{int(time.time() * 1000)}"
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "store": True,
    }
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, project, api_key_id, model, status, request, store,"
                " attempts, created, dispatched_at)"
                " SELECT :id, project, id, :model, 'queued', CAST(:request AS jsonb), true, 0,"
                " extract(epoch from now())::bigint, CASE WHEN :sent THEN now() END"
                " FROM api_keys WHERE name = 'suite' LIMIT 1"
            ),
            {"id": job_id, "model": MODEL, "request": json.dumps(request), "sent": sent},
        )
    job = poll(
        lambda: (
            row
            if (row := one(db, "SELECT status, attempts FROM jobs WHERE id = :j", j=job_id)).status
            in ("succeeded", "failed")
            else None
        ),
        90,
        "the orphaned job ran",
        every=0.5,
    )
    assert job.status == "succeeded" and job.attempts == 1  # type: ignore[attr-defined]
    stored = http.get(f"/v1/chat/completions/{job_id}").json()
    assert "Paris" in stored["choices"][0]["message"]["content"]


def test_a_batch_left_validating_by_a_dead_api_is_validated_again(
    live_worker: Stack, api_key: str, client: openai.OpenAI, db: Engine
) -> None:
    stack = live_worker
    port = free_port()
    doomed = stack.start_api_on(port, "api-doomed")
    via_doomed = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0
    )
    count, good = 30_000, 5
    rows = [
        json.dumps(
            {
                "custom_id": f"v-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    # Most lines fail validation (no such model): a long file that runs fast.
                    "model": MODEL if i < good else "no-such-model",
                    "messages": [{"role": "user", "content": f"Say {i}."}],
                    "max_tokens": 4,
                },
            }
        )
        for i in range(count)
    ]
    batch = via_doomed.batches.create(
        input_file_id=upload(via_doomed, rows).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    # kill -9 the API process validating the file once part of it is written.
    poll(
        lambda: (
            one(db, "SELECT count(*) AS n FROM batch_line_errors WHERE batch_id = :b", b=batch.id).n
        ),
        60,
        "validation under way",
        every=0.05,
    )
    stack.kill(doomed)
    assert client.batches.retrieve(batch.id).status == "validating"

    # The reconciler has another API process validate it again, from the start.
    done = wait_until(client, batch.id, {"completed", "failed"}, seconds=240)
    assert done.status == "completed", done
    assert done.request_counts.total == count
    assert done.request_counts.completed == good
    assert done.request_counts.failed == count - good
    lines = read_jsonl(client, done.output_file_id) + read_jsonl(client, done.error_file_id)
    assert Counter(line["custom_id"] for line in lines) == Counter(f"v-{i}" for i in range(count))


def test_sigterm_lets_a_worker_finish_short_jobs_and_hand_back_long_ones(
    live_worker: Stack, client: openai.OpenAI, http: httpx.Client, db: Engine
) -> None:
    stack = live_worker
    stack.wait_for_workers(2)
    long_answer: dict[str, object] = {}

    def ask_long() -> None:
        try:
            long_answer["completion"] = client.chat.completions.create(
                model=MODEL, messages=COUNTING, max_tokens=LONG, logit_bias=NO_END
            )
        except openai.APIError as exc:
            long_answer["error"] = exc

    asking = threading.Thread(target=ask_long)
    asking.start()
    long_job, holder_id = poll(  # type: ignore[misc]
        lambda: one(
            db,
            "SELECT id, worker FROM jobs WHERE status = 'running' AND request->'messages' = "
            "CAST(:m AS jsonb) AND attempts = 1 AND created_at > now() - interval '1 minute'",
            m=json.dumps(COUNTING),
        ),
        60,
        "the long job running",
    )
    holder = stack.worker_process(holder_id)
    # Short jobs until one of them runs on the same worker.
    short_ids: list[str] = []

    def short_on_holder() -> str | None:
        response = http.post(
            "/v1/chat/completions",
            headers={"Prefer": "respond-async"},
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Count to twenty."}],
                # Short: a few seconds at the slowest (float32 on two shared cores, beside the
                # long job), well inside the shutdown timeout.
                "max_tokens": 16,
                "store": True,
            },
        )
        short_ids.append(response.json()["id"])
        time.sleep(0.3)
        with db.connect() as conn:
            return conn.execute(
                text(
                    "SELECT id FROM jobs WHERE id = ANY(:ids) AND worker = :w"
                    " AND status = 'running'"
                ),
                {"ids": short_ids, "w": holder_id},
            ).scalar()

    short_job = poll(short_on_holder, 60, "a short job running beside the long one", every=0.2)
    started = time.monotonic()
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(60) == 0
    # It stopped soon after the shutdown timeout (the engine's own shutdown, on two cores shared
    # with the other worker, took up to 17 s more in CI).
    assert time.monotonic() - started < float(QUICK_REPAIRS["FERRY_SHUTDOWN_TIMEOUT_SECONDS"]) + 30
    # The short job finished on it; the long one was handed back and ran on the other worker.
    short = one(db, "SELECT status, worker, attempts FROM jobs WHERE id = :j", j=short_job)
    assert short.status == "succeeded" and short.worker == holder_id and short.attempts == 1
    asking.join(300)
    assert "error" not in long_answer, long_answer.get("error")
    job = one(
        db,
        "SELECT status, worker, attempts, completion_tokens FROM jobs WHERE id = :j",
        j=long_job,
    )
    assert job.status == "succeeded" and job.worker != holder_id and job.attempts == 2
    assert job.completion_tokens == LONG  # all of it, from the start, on the other worker
