"""The engine's known-answer check on the real engine: the suite's worker, on the shipped
settings, passed it; `ferry worker --self-check` runs it alone; a worker whose engine is broken
by a setting refuses to serve, says why, and exits with its own code."""

import json
import subprocess

import httpx
import pytest
import redis
from sqlalchemy import Engine, text

from bench.stack import FERRY, ROOT, Stack
from core.queue import WORKERS_KEY, live_beats
from core.settings import CoreSettings
from workers.model_prep import default_model_dir
from workers.self_check import DEFAULT_CHECKS, EXIT_SELF_CHECK_FAILED

pytestmark = pytest.mark.e2e

CHECKS = len(DEFAULT_CHECKS)
# Normalisation that scales every activation to nearly nothing: the model answers blank lines.
BREAKS_THE_MODEL = """--hf-overrides '{"rms_norm_eps": 10000.0}'"""


def ferry_worker(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A `ferry worker` beside the suite's, on a small KV cache, run to its end."""
    return subprocess.run(
        [*FERRY, "worker", *args],
        env=stack.env(FERRY_METRICS_PORT="0", FERRY_CPU_KV_CACHE_GIB="1", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_suites_worker_passed_its_self_check(live_worker: Stack) -> None:
    beats, _ = live_beats(redis.Redis.from_url(live_worker.redis_url).hgetall(WORKERS_KEY), 15)
    (beat,) = [b for b in beats if b.pid == live_worker.processes[0].pid]
    assert beat.self_check.startswith(f"self-check passed: {CHECKS} of {CHECKS} known answers")
    port = live_worker.metrics_ports["worker"]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "\nferry_worker_self_check_passed 1.0\n" in metrics


def test_self_check_alone_passes_on_the_shipped_settings(live_worker: Stack) -> None:
    done = ferry_worker(live_worker, "--self-check")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.strip()
        .splitlines()[-1]
        .startswith(f"self-check passed: {CHECKS} of {CHECKS} known answers")
    )


def test_a_worker_whose_engine_answers_wrong_refuses_to_serve(
    live_worker: Stack, http: httpx.Client, db: Engine
) -> None:
    model = "SmolLM2-broken"
    path = str(default_model_dir(CoreSettings().cache_dir))
    done = ferry_worker(
        live_worker, "--model", model, "--model-path", path, FERRY_ENGINE_ARGS=BREAKS_THE_MODEL
    )
    assert done.returncode == EXIT_SELF_CHECK_FAILED, done.stderr[-3000:]
    # A clear message: what failed, what the engine answered, and the setting to change.
    assert f"self-check FAILED: 0 of {CHECKS} known answers" in done.stderr
    assert f"this worker will not serve {model}" in done.stderr
    assert "asked 'What is the capital of France?', expected 'Paris', got" in done.stderr
    assert "FERRY_ENGINE_ARGS first" in done.stderr
    # The model was never announced ...
    with db.connect() as conn:
        served = conn.execute(text("SELECT name FROM served_models WHERE name = :m"), {"m": model})
        assert served.first() is None
    assert model not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    refused = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    # ... and the dashboard says which worker refused.
    workers = http.get("/v1/dashboard/workers").json()
    assert [f["model"] for f in workers["refused"]] == [model], json.dumps(workers["refused"])


def test_refused_engine_settings_stop_the_worker_before_it_loads(live_worker: Stack) -> None:
    done = ferry_worker(live_worker, FERRY_ENGINE_ARGS="--no-such-option 1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "The worker's settings are refused: unrecognized arguments: --no-such-option" in (
        done.stderr
    )
