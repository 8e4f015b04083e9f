"""SIGTERM to the API: no new connections, and the synchronous requests in flight finish (within
FERRY_SHUTDOWN_TIMEOUT_SECONDS) before the process exits; one still waiting then gets a 503."""

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import uuid4

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack, free_port
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

COUNT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def wait_running(db: Engine, tag: str, seconds: float = 60) -> None:
    """Block until the job tagged `tag` runs on the worker."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with db.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM jobs WHERE metadata->>'shutdown' = :tag"), {"tag": tag}
            ).scalar()
        if status == "running":
            return
        assert status in (None, "queued"), status
        time.sleep(0.05)
    raise AssertionError("the job did not start")


def refused(url: str, seconds: float = 5) -> bool:
    """Whether new connections to `url` are refused within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def asked_then_stopped(
    stack: Stack, api_key: str, db: Engine, name: str, timeout: float, max_tokens: int
) -> Iterator[tuple[subprocess.Popen, int, Future, float]]:
    """A second API process with `timeout` to shut down, a sync completion running through it,
    then SIGTERM: (the process, its port, the answer to come, when it was signalled)."""
    port = free_port()
    proc = stack.start_api_on(port, name, FERRY_SHUTDOWN_TIMEOUT_SECONDS=str(timeout))
    sdk = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60
    )
    tag = uuid4().hex
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            sdk.chat.completions.create,
            model=MODEL,
            messages=COUNT,
            max_tokens=max_tokens,
            temperature=0,
            metadata={"shutdown": tag},
        )
        wait_running(db, tag)
        proc.send_signal(signal.SIGTERM)
        yield proc, port, answer, time.monotonic()


def test_sigterm_lets_a_sync_request_finish(live_worker: Stack, api_key: str, db: Engine) -> None:
    timeout = 20
    with asked_then_stopped(live_worker, api_key, db, "api-shutdown", timeout, 60) as (
        proc,
        port,
        answer,
        stopped,
    ):
        assert refused(f"http://127.0.0.1:{port}/healthz")
        assert not answer.done(), "the request ended before the API stopped listening"
        completion = answer.result(timeout=timeout)
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    proc.wait(timeout)
    # Exited once the request was answered, not at the end of the timeout.
    assert time.monotonic() - stopped < timeout / 2


def test_sigterm_gives_up_on_requests_after_the_timeout(
    live_worker: Stack, api_key: str, db: Engine
) -> None:
    with asked_then_stopped(live_worker, api_key, db, "api-shutdown-short", 1, 150) as (
        proc,
        _,
        answer,
        stopped,
    ):
        proc.wait(10)
        exited = time.monotonic() - stopped
        with pytest.raises(openai.APIStatusError) as caught:
            answer.result(timeout=10)
    assert exited < 5
    # Cut off: OpenAI's envelope, a status the SDK retries; the job itself runs on.
    assert caught.value.status_code == 503
    assert caught.value.code == "service_unavailable"
    assert caught.value.response.headers["retry-after"] == "1"
