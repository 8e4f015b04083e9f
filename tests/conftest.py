"""The suite's stack: one database, one API and one real worker (vLLM) per test session."""

from collections.abc import Iterator

import httpx
import openai
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from bench.stack import Stack
from core.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A migrated test database, the API, and a worker that starts loading at once."""
    stack = Stack(extra_env={"FERRY_NO_WORKER_WAIT_SECONDS": "2"})
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
