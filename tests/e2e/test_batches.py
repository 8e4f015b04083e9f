"""OpenAI's Files and Batches API on the real stack: bad lines fail alone, every good line is
answered exactly once, cancel keeps what finished, and the window expires what did not run."""

import io
import json
import time

import openai
import pytest
from sqlalchemy import Engine, text

from tests.conftest import MODEL
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e


def line(custom_id: str, content: str = "Say hi.", **body) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 4,
                **body,
            },
        }
    )


def upload(client: openai.OpenAI, lines: list[str]):
    data = ("\n".join(lines) + "\n").encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")


def wait_until(client: openai.OpenAI, batch_id: str, statuses: set[str], seconds: float = 240):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} is still {batch.status}")


def run_to_end(client: openai.OpenAI, lines: list[str]):
    """Upload `lines` as a batch's input and wait for the batch to end; the batch."""
    batch = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    return wait_until(client, batch.id, {"completed", "failed"})


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def test_batch_with_bad_lines(client: openai.OpenAI, db: Engine) -> None:
    good = [
        line(f"good-{i}", f"Say the number {i}.", store=i % 2 == 0, metadata={"n": str(i)})
        for i in range(60)
    ]
    bad = {
        "not-json": "{this is not json",
        "wrong-method": json.dumps({**json.loads(line("m")), "method": "GET"}),
        "wrong-url": json.dumps({**json.loads(line("u")), "url": "/v1/embeddings"}),
        "no-custom-id": json.dumps(
            {k: v for k, v in json.loads(line("x")).items() if k != "custom_id"}
        ),
        "duplicate": line("good-3"),
        "bad-body": line("bad-temp", temperature=7),
        "unknown-model": json.dumps(
            {**json.loads(line("ghost")), "body": {"model": "nope", "messages": []}}
        ),
    }
    lines = good[:30] + list(bad.values()) + good[30:]
    file = upload(client, lines)
    validate("OpenAIFile", client.files.with_raw_response.retrieve(file.id).http_response.json())
    assert file.purpose == "batch" and file.bytes > 0

    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "batches"},
    )
    assert batch.status in ("validating", "in_progress")
    done = wait_until(client, batch.id, {"completed", "failed"})
    raw = client.batches.with_raw_response.retrieve(batch.id).http_response.json()
    validate("Batch", raw)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(lines), 60, len(bad))
    for stamp in ("in_progress_at", "finalizing_at", "completed_at", "expires_at"):
        assert raw[stamp] >= raw["created_at"]

    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    answered = [o["custom_id"] for o in output]
    assert sorted(answered) == sorted(f"good-{i}" for i in range(60))  # each exactly once
    for record in output:
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert record["response"]["body"]["object"] == "chat.completion"
        validate("CreateChatCompletionResponse", record["response"]["body"])
    assert len(errors) == len(bad)
    numbers = [e["error"]["line"] for e in errors]
    assert numbers == list(range(31, 31 + len(bad)))
    by_line = {e["error"]["line"]: e for e in errors}
    assert by_line[31]["error"]["code"] == "invalid_json"
    assert by_line[32]["error"]["code"] == "invalid_method"
    assert by_line[33]["error"]["code"] == "invalid_url"
    assert by_line[34]["error"]["code"] == "missing_required_parameter"
    assert by_line[35]["error"]["code"] == "duplicate_custom_id"
    assert by_line[36]["error"]["param"] == "body.temperature"
    assert by_line[37]["custom_id"] == "ghost"

    listed = client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]
    # Each line's store and metadata are honoured like a single request's.
    stored = client.chat.completions.list(metadata={"n": "4"})
    assert [c.choices[0].message.content for c in stored] == [
        o["response"]["body"]["choices"][0]["message"]["content"]
        for o in output
        if o["custom_id"] == "good-4"
    ]
    assert client.chat.completions.list(metadata={"n": "5"}).data == []
    with db.connect() as conn:
        unstored = conn.execute(
            text(
                "SELECT count(*) FROM jobs"
                " WHERE batch_id = :b AND NOT store AND response IS NOT NULL"
            ),
            {"b": batch.id},
        ).scalar_one()
    assert unstored == 0


def test_file_with_no_valid_line_fails_the_batch(client: openai.OpenAI) -> None:
    file = upload(client, ["nope", line("a", temperature=9)])
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_until(client, batch.id, {"failed", "completed"})
    assert failed.status == "failed"
    assert [e.line for e in failed.errors.data] == [1, 2]


def test_cancel_midway_keeps_what_finished(client: openai.OpenAI) -> None:
    # A few short lines finish first; the long ones are still running when the cancel comes.
    lines = [
        line(f"c-{i}", "Write a long story about the sea.", max_tokens=8 if i < 8 else 300)
        for i in range(120)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_until(client, batch.id, {"cancelled"})
    output = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    assert output and errors
    assert sorted(r["custom_id"] for r in output + errors) == sorted(f"c-{i}" for i in range(120))
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert done.request_counts.completed == len(output)


def test_window_ends_and_the_batch_expires(client: openai.OpenAI, db: Engine) -> None:
    lines = [line(f"e-{i}", "Write a long story about the sea.", max_tokens=300) for i in range(80)]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_until(client, batch.id, {"in_progress"})
    with db.begin() as conn:  # as if 24 hours had passed
        conn.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :b"),
            {"b": batch.id},
        )
    done = wait_until(client, batch.id, {"expired"})
    errors = read_jsonl(client, done.error_file_id)
    output = read_jsonl(client, done.output_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(r["custom_id"] for r in output + errors) == sorted(f"e-{i}" for i in range(80))
    assert done.expired_at is not None


def test_cli_submits_waits_and_downloads(live_worker, api_key, tmp_path) -> None:
    import os
    import subprocess
    import sys

    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join([line(f"cli-{i}") for i in range(8)] + ["broken"]) + "\n")
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"{live_worker.base_url}/v1",
        "OPENAI_API_KEY": api_key,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "batch",
            "submit",
            str(source),
            "--wait",
            "--poll",
            "0.3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    output = [json.loads(x) for x in (tmp_path / "requests.output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "requests.errors.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"cli-{i}" for i in range(8))
    assert [e["error"]["line"] for e in errors] == [9]


def test_an_oversized_custom_id_fails_its_line_alone(client: openai.OpenAI) -> None:
    long_id = "x" * 600  # custom_id columns hold 512 characters
    lines = [line("ok-1", max_tokens=1), line(long_id), line("ok-2", max_tokens=1)]
    lines.append(line("ok-3", max_tokens=1))
    done = run_to_end(client, lines)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 3, 1)
    output = read_jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == ["ok-1", "ok-2", "ok-3"]
    (error,) = read_jsonl(client, done.error_file_id)
    assert error["custom_id"] is None and error["response"] is None
    assert error["error"]["line"] == 2
    assert (error["error"]["code"], error["error"]["param"]) == (
        "string_above_max_length",
        "custom_id",
    )
    assert "maximum length 512" in error["error"]["message"]


def test_every_column_limit_fails_its_line_alone(client: openai.OpenAI) -> None:
    bad = {
        "metadata key": (line("k", metadata={"k" * 65: "v"}), "string_above_max_length"),
        "metadata value": (line("v", metadata={"k": "v" * 513}), "string_above_max_length"),
        "metadata pairs": (
            line("p", metadata={f"k{i}": "v" for i in range(17)}),
            "object_above_max_properties",
        ),
        "model name": (line("m", model="m" * 300), "model_not_found"),
        "NaN": (line("n", temperature=1).replace('"temperature": 1', '"temperature": NaN'), None),
    }
    good = [line(f"g-{i}", max_tokens=1) for i in range(3)]
    lines = good[:2] + [text_ for text_, _ in bad.values()] + good[2:]
    done = run_to_end(client, lines)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, len(bad))
    errors = {e["error"]["line"]: e["error"] for e in read_jsonl(client, done.error_file_id)}
    codes = [errors[3 + i]["code"] for i in range(len(bad))]
    assert codes == [code or "invalid_json" for _, code in bad.values()]
    for error in errors.values():
        assert "character varying" not in error["message"]


def test_a_file_name_the_table_cannot_hold_is_400(http, db: Engine) -> None:
    with db.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM files")).scalar_one()
    data = (line("a") + "\n").encode()
    response = http.post(
        "/v1/files",
        files={"file": ("x" * 1100 + ".jsonl", data)},
        data={"purpose": "batch"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("file", "string_above_max_length")
    assert "character varying" not in error["message"]
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM files")).scalar_one() == before
    longest = "x" * (1024 - len(".jsonl")) + ".jsonl"
    response = http.post("/v1/files", files={"file": (longest, data)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == longest


def test_database_error_text_never_reaches_the_client(http) -> None:
    # A NUL in a path is refused by the database driver: the client learns only that.
    error = http.get("/v1/files/file-%00").json()["error"]
    assert error["code"] == "invalid_value"
    assert error["message"] == "The request holds a value that cannot be stored."


def test_a_batch_cancelled_while_it_validates_stops_creating_jobs(
    client: openai.OpenAI, db: Engine
) -> None:
    count = 50_000
    lines = [line(f"v-{i}", max_tokens=1) for i in range(count)]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )

    def jobs() -> dict[str, int]:
        with db.connect() as conn:
            rows = conn.execute(
                text("SELECT status, count(*) FROM jobs WHERE batch_id = :b GROUP BY status"),
                {"b": batch.id},
            ).all()
        return {status: int(n) for status, n in rows}

    deadline = time.monotonic() + 120
    while not jobs():  # its first lines are jobs: it is midway
        assert time.monotonic() < deadline
        assert client.batches.retrieve(batch.id).status == "validating"
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_until(client, batch.id, {"cancelled"})
    created = jobs()
    time.sleep(3)  # time enough for the validation to have gone on, had it not stopped
    assert jobs() == created
    assert set(created) == {"cancelled"}  # none was sent to a worker
    assert 0 < done.request_counts.total < count
    assert done.request_counts.completed == 0
    errors = read_jsonl(client, done.error_file_id)
    assert len(errors) == sum(created.values())
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with db.connect() as conn:
        started = conn.execute(
            text("SELECT count(*) FROM jobs WHERE batch_id = :b AND started_at IS NOT NULL"),
            {"b": batch.id},
        ).scalar_one()
    assert started == 0
