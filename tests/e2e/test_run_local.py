"""`make run` (scripts/run-local.sh) on its shipped defaults: it answers right, and it keeps
serving when its worker is killed outright.

Its own database and Redis database, its own port: the suite's stack is not touched.
"""

import os
import re
import signal
import subprocess
import time

import httpx
import openai
import pytest
import redis

from bench.stack import ROOT, Stack, descendants, free_port, wait_gone
from core.queue import WORKERS_KEY, live_beats
from tests.conftest import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def beating_pids(stack: Stack) -> set[int]:
    live, _ = live_beats(redis.Redis.from_url(stack.redis_url).hgetall(WORKERS_KEY), ttl=15)
    return {beat.pid for beat in live}


def wait_for(what: str, timeout: float, found) -> object:
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)
    return value


def ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_make_run_answers_right_and_outlives_a_killed_worker() -> None:
    stack = Stack(database="ferry_test_run", redis_db=14)
    stack.reset()
    log_path = stack.log_dir / "run-local.log"
    stack.log_dir.mkdir(exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        script = subprocess.Popen(
            [str(ROOT / "scripts" / "run-local.sh")],
            cwd=ROOT,
            env=stack.env(FERRY_PORT=str(port), FERRY_METRICS_PORT=str(free_port())),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("make run ready", 300, lambda: ready(base_url))
        key = re.search(r"OPENAI_API_KEY=(\S+)", log_path.read_text())
        assert key, log_path.read_text()
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key[1], max_retries=0)

        # The README's own example, on the defaults that ship.
        def ask() -> str:
            completion = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
            )
            return completion.choices[0].message.content or ""

        assert "Paris" in ask()

        # kill -9 the worker's main process alone: its engine goes with it ...
        (first,) = beating_pids(stack)
        engine = descendants(first)
        assert any("EngineCore" in p.name() for p in engine), [p.name() for p in engine]
        os.kill(first, signal.SIGKILL)
        left = wait_gone(engine, timeout=10)
        assert not left, f"engine processes outlived their worker: {[p.name() for p in left]}"

        # ... the API keeps serving, the script says why and starts another worker ...
        assert httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        wait_for(
            "the restart line",
            10,
            lambda: (
                "the worker exited (killed by SIGKILL); starting it again" in log_path.read_text()
            ),
        )
        assert script.poll() is None
        wait_for("a new worker", 300, lambda: beating_pids(stack) - {first})
        wait_for("ready again", 60, lambda: ready(base_url))
        # ... and requests succeed again.
        assert "Paris" in ask()
        children = descendants(script.pid)
    finally:
        # Ctrl-C: the terminal signals the whole foreground group.
        os.killpg(script.pid, signal.SIGINT)
        code = script.wait(60)
    assert code == 130, log_path.read_text()[-3000:]
    assert not wait_gone(children, timeout=10), "Ctrl-C left processes running"
    stack.drop_database()
