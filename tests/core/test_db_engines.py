"""Database errors name the statement, never the clients' values bound to it."""

import ast
import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from core.db import async_engine, sync_engine

ROOT = Path(__file__).resolve().parents[2]
MAKERS = {"create_engine", "create_async_engine", "engine_from_config"}
# Engines made in files this change does not own; `strict`: once one hides them, drop its mark.
# Postgres' own database: these tests create only temporary tables.
URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SECRET = "custom-id-of-a-client-" + "x" * 600
# The column is too short for it: Postgres refuses the value without quoting it.
STATEMENTS = (
    "CREATE TEMPORARY TABLE t (custom_id varchar(512))",
    "INSERT INTO t (custom_id) VALUES (:custom_id)",
)


def _error_of(engine: Engine) -> DBAPIError:
    with engine.connect() as conn:
        conn.execute(text(STATEMENTS[0]))
        with pytest.raises(DBAPIError) as raised:
            conn.execute(text(STATEMENTS[1]), {"custom_id": SECRET})
    return raised.value


def test_a_plain_engine_puts_the_parameters_in_its_errors() -> None:
    """What the engines below must not do (so that the tests below can fail)."""
    engine = create_engine(URL)
    try:
        assert SECRET[:20] in str(_error_of(engine))  # shortened, but there
    finally:
        engine.dispose()


def test_the_sync_engine_hides_parameters() -> None:
    engine = sync_engine(URL, pool_size=1)
    try:
        error = str(_error_of(engine))
    finally:
        engine.dispose()
    assert "value too long" in error and "INSERT INTO t" in error
    assert SECRET[:20] not in error
    assert "hidden" in error


def test_the_async_engine_hides_parameters() -> None:
    async def error_text() -> str:
        engine = async_engine(URL, pool_size=1)
        try:
            async with engine.connect() as conn:
                await conn.execute(text(STATEMENTS[0]))
                with pytest.raises(DBAPIError) as raised:
                    await conn.execute(text(STATEMENTS[1]), {"custom_id": SECRET})
            return str(raised.value)
        finally:
            await engine.dispose()

    error = asyncio.run(error_text())
    assert "value too long" in error
    assert SECRET[:20] not in error


def _engine_makers() -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in ("core", "api", "workers", "cli", "migrations")
        for path in (ROOT / package).rglob("*.py")
    )


@pytest.mark.parametrize("path", _engine_makers())
def test_every_engine_is_made_hiding_parameters(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if name not in MAKERS:
            continue
        hides = [
            k for k in node.keywords if k.arg == "hide_parameters" and ast.literal_eval(k.value)
        ]
        assert hides, f"{path}:{node.lineno}: {name}(...) without hide_parameters=True"
