"""Retention per project: how long stored completions are kept, files' `expires_after`, batches'
`output_expires_after` (api.retention).

Time is moved by ageing rows in the database (an hour is the shortest expiry OpenAI allows);
the sweep the reconciler runs is then run here, so each test sees exactly what one sweep does.
"""

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from api import retention
from bench.stack import Stack
from core.db import async_engine, async_sessions
from tests.api.test_api_errors import assert_envelope
from tests.conftest import MODEL
from tests.e2e.test_batches import line, upload, wait_until

pytestmark = pytest.mark.e2e

HOUR = 3600
HI = [{"role": "user", "content": "Say hi."}]


def sweep(stack: Stack) -> retention.Retained:
    """One retention sweep, as the reconciler runs it."""

    async def run() -> retention.Retained:
        engine = async_engine(stack.database_url, pool_size=2)
        try:
            return await retention.sweep(async_sessions(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def team(stack: Stack, *settings: str) -> tuple[str, openai.OpenAI]:
    name = f"keep-{uuid.uuid4().hex[:8]}"
    stack.ferry("projects", "create", name)
    if settings:
        stack.ferry("projects", "set", name, *settings)
    key = stack.create_key("retention", project=name)
    return name, openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def jsonl(name: str = "in.jsonl") -> tuple[str, io.BytesIO]:
    return name, io.BytesIO(b'{"a": 1}\n')


def age(db: Engine, table: str, row_id: str, column: str, by: timedelta) -> None:
    with db.begin() as conn:
        conn.execute(
            text(f"UPDATE {table} SET {column} = {column} - :by WHERE id = :id"),
            {"by": by, "id": row_id},
        )


def test_an_upload_expires_as_asked_or_as_its_project_says(live_worker: Stack) -> None:
    _, client = team(live_worker, "--file-ttl", "2h")
    asked = client.files.create(
        file=jsonl(), purpose="batch", expires_after={"anchor": "created_at", "seconds": 5 * HOUR}
    )
    assert asked.expires_at == asked.created_at + 5 * HOUR
    assert client.files.retrieve(asked.id).expires_at == asked.expires_at
    defaulted = client.files.create(file=jsonl(), purpose="batch")
    assert defaulted.expires_at == defaulted.created_at + 2 * HOUR

    _, unset = team(live_worker)
    kept = unset.files.create(file=jsonl(), purpose="batch")
    assert kept.expires_at is None
    assert "expires_at" not in kept.model_dump(exclude_unset=True)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"},
         "expires_after.seconds", "integer_below_min_value"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"},
         "expires_after.seconds", "integer_above_max_value"),
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
         "expires_after.anchor", "invalid_value"),
        ({"expires_after[seconds]": "3600"}, "expires_after.anchor", "missing_required_parameter"),
    ],
)  # fmt: skip
def test_a_bad_expires_after_is_refused(http: httpx.Client, fields, param, code) -> None:
    answer = http.post("/v1/files", data={"purpose": "batch", **fields}, files={"file": jsonl()})
    assert_envelope(answer, 400, param=param, code=code)


def test_an_expired_file_answers_404_at_once_and_its_bytes_go_with_the_next_sweep(
    live_worker: Stack, db: Engine
) -> None:
    _, client = team(live_worker)
    doomed = client.files.create(
        file=jsonl(), purpose="batch", expires_after={"anchor": "created_at", "seconds": HOUR}
    )
    kept = client.files.create(file=jsonl(), purpose="batch")
    age(db, "files", doomed.id, "expires_at", timedelta(hours=1, seconds=1))

    for call in (client.files.retrieve, client.files.content):
        with pytest.raises(openai.NotFoundError):
            call(doomed.id)
    assert [f.id for f in client.files.list()] == [kept.id]
    with db.connect() as conn:
        chunks = "SELECT count(*) FROM file_chunks WHERE file_id = :id"
        assert conn.scalar(text(chunks), {"id": doomed.id}) == 1

    done = sweep(live_worker)
    assert doomed.id in done.files and kept.id not in done.files
    with db.connect() as conn:
        assert conn.scalar(text(chunks), {"id": doomed.id}) == 0
        assert conn.scalar(text(chunks), {"id": kept.id}) == 1
        deleted = "SELECT deleted_at FROM files WHERE id = :id"
        assert conn.scalar(text(deleted), {"id": doomed.id}) is not None
    assert client.files.retrieve(kept.id).id == kept.id


def test_a_batchs_output_files_expire_as_it_asked(live_worker: Stack, db: Engine) -> None:
    _, client = team(live_worker, "--batch-output-ttl", "3d")
    file = upload(client, [line("r1", max_tokens=2)])
    asked = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 2 * HOUR}},
    )
    defaulted = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for batch_id, seconds in ((asked.id, 2 * HOUR), (defaulted.id, 3 * 86400)):
        done = wait_until(client, batch_id, {"completed", "failed"})
        assert done.status == "completed", done
        output = client.files.retrieve(done.output_file_id)
        assert output.expires_at == output.created_at + seconds
        assert json.loads(client.files.content(output.id).text)["custom_id"] == "r1"


def test_stored_completions_older_than_the_projects_retention_are_deleted(
    live_worker: Stack, db: Engine
) -> None:
    _, client = team(live_worker, "--completions-ttl", "1d")
    _, other = team(live_worker)
    old = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, store=True)
    new = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, store=True)
    theirs = other.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, store=True)
    for job_id in (old.id, theirs.id):
        age(db, "jobs", job_id, "created_at", timedelta(days=1, minutes=1))

    done = sweep(live_worker)
    assert old.id in done.completions
    assert new.id not in done.completions and theirs.id not in done.completions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(old.id)
    assert [c.id for c in client.chat.completions.list()] == [new.id]
    assert other.chat.completions.retrieve(theirs.id).id == theirs.id
    # The content is gone; the accounting stays.
    with db.connect() as conn:
        gone = conn.execute(
            text("SELECT request, response, total_tokens FROM jobs WHERE id = :id"), {"id": old.id}
        ).one()
    assert gone.request is None and gone.response is None
    assert gone.total_tokens == old.usage.total_tokens


def test_a_backlog_goes_in_bounded_rounds(live_worker: Stack, db: Engine, monkeypatch) -> None:
    name, _ = team(live_worker, "--completions-ttl", "1h")
    created = datetime.now(UTC) - timedelta(hours=2)
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
                " created, created_at, queued_at, finished_at, request, response)"
                " SELECT :name || '-' || n, :name, k.id, :model, 'succeeded', true, 1,"
                " 0, :created, :created, :created, '{}', '{}'"
                " FROM (SELECT id FROM api_keys WHERE project = :name LIMIT 1) AS k,"
                " generate_series(1, 250) AS n"
            ),
            {"name": name, "model": MODEL, "created": created},
        )
    monkeypatch.setattr(retention, "COMPLETIONS", 50)
    monkeypatch.setattr(retention, "ROUNDS", 3)
    # At most ROUNDS statements of COMPLETIONS rows per sweep: 150, then the 100 left.
    assert len(sweep(live_worker).completions) == 150
    assert len(sweep(live_worker).completions) == 100
    assert sweep(live_worker).completions == []
