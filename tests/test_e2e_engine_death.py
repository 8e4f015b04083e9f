"""A worker whose engine dies fails its in-flight job clearly and exits, so a supervisor restarts
it; it does not linger as a silently dead worker."""

import threading
import time
from pathlib import Path

import openai
import psutil
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack

pytestmark = pytest.mark.e2e

DOOMED = "smol-doomed"


def test_engine_death_fails_the_job_and_ends_the_worker(
    live_worker: Stack, api_key: str, db: Engine
) -> None:
    stack = live_worker
    model_path = Path(stack.ferry("model", "prepare").strip().splitlines()[-1])
    worker = stack.start_worker("worker-doomed", "--model", DOOMED, "--model-path", str(model_path))
    stack.wait_for_workers(2)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0)

    outcome: dict[str, BaseException] = {}

    def ask() -> None:
        try:
            client.chat.completions.create(
                model=DOOMED,
                messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
                max_tokens=1500,
                temperature=1.0,
            )
        except openai.APIError as exc:
            outcome["error"] = exc

    asking = threading.Thread(target=ask)
    asking.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.connect() as conn:
            running = conn.execute(
                text("SELECT count(*) FROM jobs WHERE model = :m AND status = 'running'"),
                {"m": DOOMED},
            ).scalar_one()
        if running:
            break
        time.sleep(0.1)
    assert running == 1

    cores = [
        p for p in psutil.Process(worker.pid).children(recursive=True) if "EngineCore" in p.name()
    ]
    assert cores, "the worker has no engine core process"
    for core in cores:
        core.kill()

    asking.join(60)
    error = outcome.get("error")
    assert isinstance(error, openai.InternalServerError)
    assert "engine stopped" in error.message
    assert worker.wait(60) != 0

    with db.connect() as conn:
        job = conn.execute(
            text("SELECT status, error FROM jobs WHERE model = :m"), {"m": DOOMED}
        ).one()
    assert job.status == "failed"
    assert job.error["error"]["code"] == "engine_error"

    # The other model's worker is untouched.
    after = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
    )
    assert after.choices[0].message.content

    with db.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE model = :m"), {"m": DOOMED})
        conn.execute(text("DELETE FROM served_models WHERE name = :m"), {"m": DOOMED})
