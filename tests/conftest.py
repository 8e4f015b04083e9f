"""The suite's stack: one database, one API and one real worker (vLLM) per test session."""

import os
from collections.abc import Iterator

import httpx
import openai
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from bench.stack import Stack
from core.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fault tests (they kill workers, restart Redis, stop Postgres) run after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A migrated test database, the API, and a worker that starts loading at once."""
    # FERRY_TEST_DATABASE / FERRY_TEST_REDIS_DB let two suites share one Postgres and Redis.
    stack = Stack(
        database=os.environ.get("FERRY_TEST_DATABASE", "ferry_test"),
        redis_db=int(os.environ.get("FERRY_TEST_REDIS_DB", "15")),
        extra_env={
            "FERRY_NO_WORKER_WAIT_SECONDS": "2",
            # Faults are found and repaired within seconds rather than the defaults' half minute.
            "FERRY_RECONCILE_SECONDS": "1",
            "FERRY_REQUEUE_GRACE_SECONDS": "5",
            "FERRY_WORKER_TTL_SECONDS": "6",
            "FERRY_HEARTBEAT_SECONDS": "1",
            "FERRY_SHUTDOWN_TIMEOUT_SECONDS": "8",
        },
    )
    stack.reset()
    try:
        stack.start_worker()
        stack.start_api()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def api_key(stack: Stack) -> str:
    return stack.create_key("suite")


@pytest.fixture(scope="session")
def live_worker(stack: Stack) -> Stack:
    """The stack, once its worker has loaded the engine and beats."""
    stack.wait_for_workers(1)
    return stack


@pytest.fixture(scope="session")
def db(stack: Stack) -> Iterator[Engine]:
    engine = create_engine(stack.database_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def http(stack: Stack, api_key: str) -> Iterator[httpx.Client]:
    """A raw HTTP client with the suite's key, for what the SDK would refuse to send."""
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
    ) as client:
        yield client


@pytest.fixture
def client(live_worker: Stack, api_key: str) -> openai.OpenAI:
    """The official SDK pointed at Ferry, with a live worker behind it."""
    return openai.OpenAI(base_url=f"{live_worker.base_url}/v1", api_key=api_key, max_retries=0)
