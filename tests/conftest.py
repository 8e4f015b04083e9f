"""The suite's stack: one database, one API and one real worker (vLLM) per test session."""

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from bench.stack import Stack
from core.settings import DEFAULT_MODEL

MODEL = DEFAULT_MODEL


# A test that asks for any of these uses a service: the real stack (Postgres, Redis, a vLLM
# worker), or a database or broker of its own.
SERVICE_FIXTURES = {"stack", "api_key", "live_worker", "db", "http", "client"}
SERVICE_FIXTURES |= {"broker", "database_url"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need no service are marked `pure` (`make unit` runs them alone); fault tests
    (they kill workers, restart Redis, stop Postgres) run after all the others."""
    for item in items:
        needs = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if not needs and not any(item.get_closest_marker(m) for m in ("services", "e2e", "faults")):
            item.add_marker(pytest.mark.pure)
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)


SERVICE_PORTS = {5432, 6379}


@contextlib.contextmanager
def _no_service() -> Iterator[None]:
    """Reaching Postgres or Redis, or starting a process, fails the test: it is not pure."""
    connect, popen = socket.socket.connect, subprocess.Popen.__init__

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[1] in SERVICE_PORTS:
            raise AssertionError(f"a pure test reached {address}; mark it `services`")
        return connect(sock, address)

    def guarded_popen(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a pure test started a process; mark it `services`")

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    subprocess.Popen.__init__ = guarded_popen  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = connect  # type: ignore[method-assign]
        subprocess.Popen.__init__ = popen  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def _guard_pure(item: pytest.Item) -> Any:
    """A pure test's setup and call run under `_no_service`."""
    if item.get_closest_marker("pure") is None:
        return (yield)
    with _no_service():
        return (yield)


pytest_runtest_setup = pytest_runtest_call = _guard_pure


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A migrated test database, the API, and a worker that starts loading at once, all on the
    shipped settings (a test about one setting starts a process of its own with it)."""
    # FERRY_TEST_DATABASE / FERRY_TEST_REDIS_DB let two suites share one Postgres and Redis.
    stack = Stack(
        database=os.environ.get("FERRY_TEST_DATABASE", "ferry_test"),
        redis_db=int(os.environ.get("FERRY_TEST_REDIS_DB", "15")),
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
