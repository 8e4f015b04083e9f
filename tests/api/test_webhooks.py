"""Webhooks through the API and the CLI, with no worker: the trigger writes the event and its
deliveries in the transaction that ends a batch, the sender signs and sends them, `ferry
webhooks` keeps its contract, a request's Ferry-Callback-URL is checked, and the dashboard and
/metrics show failing endpoints. On a database of its own, migrated with Alembic."""

import io
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

from bench.stack import FERRY, ROOT, Stack, free_port
from tests.openai_schema import validate

DATABASE = os.environ.get("FERRY_TEST_DATABASE", "ferry_test") + "_webhooks"
TOKEN = "scrape-webhooks-test"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A database of its own and an API process (no worker: nothing here runs a model)."""
    stack = Stack(
        database=DATABASE,
        redis_db=int(os.environ.get("FERRY_TEST_REDIS_DB", "15")),
        extra_env={"FERRY_METRICS_TOKEN": TOKEN},
    )
    stack.drop_database()
    stack.ferry("db", "upgrade")
    try:
        stack.start_api_on(stack.port, "api-webhooks")
        yield stack
    finally:
        stack.stop()
        stack.drop_database()


@pytest.fixture(scope="module")
def db(stack: Stack) -> Iterator[Engine]:
    engine = create_engine(stack.database_url, poolclass=NullPool)
    yield engine
    engine.dispose()


class Receiver:
    """A small HTTP server that records what it is sent and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                self.send_response(receiver.status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(self, count: int, seconds: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.received) >= count, self.received
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def project(stack: Stack) -> tuple[str, str]:
    """A new project and a key of it."""
    name = f"wh-{uuid.uuid4().hex[:8]}"
    return name, stack.create_key("webhooks", project=name)


def ferry(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FERRY, "webhooks", *args], env=stack.env(), cwd=ROOT, capture_output=True, text=True
    )


def hooks(stack: Stack, *args: str) -> Any:
    done = ferry(stack, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def failed_batch(stack: Stack, key: str) -> str:
    """A batch none of whose lines is valid: it fails in the API."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    upload = client.files.create(file=("in.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return batch.id


def insert_batches(conn: Connection, project: str, count: int, status: str) -> None:
    """`count` batches of the project's (ids batch_PROJECT_1, ...) in `status`, all written in
    the caller's transaction, with the input file they name."""
    key_id = conn.execute(
        text("SELECT id FROM api_keys WHERE project = :p"), {"p": project}
    ).scalar_one()
    conn.execute(
        text(
            "INSERT INTO files (id, project, api_key_id, filename, purpose, bytes)"
            " VALUES (:f, :p, :k, 'in.jsonl', 'batch', 0)"
        ),
        {"f": f"file-{project}", "p": project, "k": key_id},
    )
    conn.execute(
        text(
            "INSERT INTO batches (id, project, api_key_id, endpoint, input_file_id,"
            " completion_window, status, total, invalid)"
            " SELECT 'batch_' || :p || '_' || n, :p, :k, '/v1/chat/completions', :f, '24h',"
            " :s, 0, 0 FROM generate_series(1, :n) AS n"
        ),
        {"p": project, "k": key_id, "f": f"file-{project}", "s": status, "n": count},
    )


def test_the_event_and_its_deliveries_are_written_in_the_transaction_that_ends_the_batch(
    stack: Stack, db: Engine
) -> None:
    name, _ = project(stack)
    hooks(stack, "add", "http://127.0.0.1:9/a", "--project", name)
    hooks(stack, "add", "http://127.0.0.1:9/b", "--project", name, "--events", "batch.cancelled")
    hooks(stack, "add", "http://127.0.0.1:9/c", "--project", name, "--events", "batch.failed")
    with db.begin() as conn:
        insert_batches(conn, name, 1, "in_progress")

    def cancel(conn) -> list:
        conn.execute(
            text("UPDATE batches SET status = 'cancelled' WHERE id = :b"), {"b": f"batch_{name}_1"}
        )
        return list(
            conn.execute(
                text(
                    "SELECT e.type, e.payload, d.endpoint_id, d.status FROM webhook_events e"
                    " JOIN webhook_deliveries d ON d.event_id = e.id WHERE e.project = :p"
                ),
                {"p": name},
            )
        )

    # Rolled back, the change takes its event with it.
    with db.connect() as conn:
        assert len(cancel(conn)) == 2
        conn.rollback()
    with db.connect() as conn:
        gone = conn.execute(
            text("SELECT count(*) FROM webhook_events WHERE project = :p"), {"p": name}
        )
        assert gone.scalar_one() == 0
    with db.begin() as conn:
        rows = cancel(conn)
    assert {row.type for row in rows} == {"batch.cancelled"}
    assert len(rows) == 2 and {row.status for row in rows} == {"pending"}
    payload = rows[0].payload
    validate("WebhookBatchCancelled", payload)
    assert payload["data"] == {"id": f"batch_{name}_1"} and payload["id"].startswith("evt_")


def test_a_failed_batch_is_sent_signed_to_the_projects_endpoint(
    stack: Stack, db: Engine, receiver: Receiver
) -> None:
    name, key = project(stack)
    added = hooks(stack, "add", receiver.url(), "--project", name)
    assert set(added) == {"id", "url", "project", "events", "secret"}
    assert added["events"] is None and added["project"] == name
    batch_id = failed_batch(stack, key)
    (sent,) = receiver.wait(1)
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    event = sdk.webhooks.unwrap(sent["body"], sent["headers"], secret=added["secret"])
    assert (event.type, event.data.id) == ("batch.failed", batch_id)
    assert sent["headers"]["webhook-id"] == event.id
    validate("WebhookBatchFailed", json.loads(sent["body"]))

    shown = []
    deadline = time.monotonic() + 10
    while not shown and time.monotonic() < deadline:
        shown = hooks(stack, "deliveries", added["id"])
    assert [(d["event_id"], d["attempt"], d["status_code"], d["outcome"]) for d in shown] == [
        (event.id, 1, 200, "delivered")
    ]
    assert set(shown[0]) == {
        "event_id",
        "type",
        "attempt",
        "started_at",
        "status_code",
        "error",
        "outcome",
    }

    again = hooks(stack, "redeliver", event.id)
    assert again == {"event_id": event.id, "deliveries": 1}
    resent = receiver.wait(2)[1]
    assert resent["headers"]["webhook-id"] == event.id and resent["body"] == sent["body"]


def test_the_cli_keeps_its_contract(stack: Stack) -> None:
    name, _ = project(stack)
    added = hooks(
        stack, "add", "http://127.0.0.1:9/x", "--project", name, "--events", "batch.failed"
    )
    (listed,) = hooks(stack, "list", "--project", name)
    assert listed == {
        "id": added["id"],
        "url": "http://127.0.0.1:9/x",
        "project": name,
        "events": ["batch.failed"],
        "created_at": listed["created_at"],
        "circuit": "closed",
        "consecutive_failures": 0,
    }
    assert isinstance(listed["created_at"], int)
    assert added["secret"] not in json.dumps(hooks(stack, "list"))

    rotated = hooks(stack, "rotate", added["id"], "--grace", "2h")
    assert set(rotated) == {"id", "secret", "previous_secret_expires_at"}
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != added["secret"]
    assert abs(rotated["previous_secret_expires_at"] - (time.time() + 7200)) < 60

    callback = hooks(stack, "callback-secret", "--project", name)
    assert callback["project"] == name and callback["secret"].startswith("whsec_")

    unknown = ferry(stack, "add", "http://127.0.0.1:9/", "--project", name, "--events", "batch.x")
    assert unknown.returncode == 2 and "batch.x" in unknown.stderr
    refused = ferry(stack, "add", "http://10.0.0.1/", "--project", name)
    assert refused.returncode == 2 and "10.0.0.1" in refused.stderr
    assert refused.stdout == ""

    assert hooks(stack, "remove", added["id"]) == {"id": added["id"], "deleted": True}
    assert hooks(stack, "list", "--project", name) == []
    assert ferry(stack, "remove", added["id"]).returncode == 1


def chat(stack: Stack, key: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "any-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def test_a_callback_url_is_checked(stack: Stack) -> None:
    name, key = project(stack)
    refusals = [
        (chat(stack, key, {"Ferry-Callback-URL": "http://127.0.0.1:9/"}), "respond-async"),
        (
            chat(stack, key, {"Prefer": "respond-async", "Ferry-Callback-URL": "http://10.1.1.1/"}),
            "10.1.1.1",
        ),
        (
            chat(stack, key, {"Prefer": "respond-async", "Ferry-Callback-URL": "ftp://x/"}),
            "http",
        ),
        (
            chat(
                stack, key, {"Prefer": "respond-async", "Ferry-Callback-URL": "http://127.0.0.1:9/"}
            ),
            f"ferry webhooks callback-secret --project {name}",
        ),
    ]
    for response, said in refusals:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_callback_url" and error["param"] is None
        assert error["type"] == "invalid_request_error"
        assert said in error["message"], error


def attempts_of(db: Engine, endpoint_id: str) -> int:
    """How many attempts have been made to send to the endpoint."""
    with db.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d"
                " ON d.id = a.delivery_id WHERE d.endpoint_id = :e"
            ),
            {"e": endpoint_id},
        ).scalar_one()


def test_a_dead_endpoint_opens_its_circuit_and_the_dashboard_and_metrics_show_it(
    stack: Stack, db: Engine
) -> None:
    name, key = project(stack)
    dead = f"http://127.0.0.1:{free_port()}/gone"
    added = hooks(stack, "add", dead, "--project", name)
    # Five batches end in one transaction: each event's first attempt fails at once.
    with db.begin() as conn:
        insert_batches(conn, name, 5, "failed")
    view: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while not view.get("open_circuits") and time.monotonic() < deadline:
        response = httpx.get(
            f"{stack.base_url}/v1/dashboard/webhooks",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        view = response.json()
        time.sleep(0.5)
    assert view["object"] == "dashboard.webhooks" and view["scope"] == "project"
    assert view["open_circuits"] == 1
    (failing,) = view["failing"]
    assert failing["id"] == added["id"] and failing["url"] == dead
    assert failing["circuit"] == "open" and failing["consecutive_failures"] >= 5
    assert failing["pending"] == 5 and failing["last_failure_at"] is not None
    assert view["oldest_pending_seconds"] > 0
    (listed,) = hooks(stack, "list", "--project", name)
    assert listed["circuit"] == "open" and listed["consecutive_failures"] >= 5

    # While it is open, nothing is retried.
    before = attempts_of(db, added["id"])
    with db.connect() as conn:
        still_open = conn.execute(
            text(
                "SELECT extract(epoch FROM circuit_open_until - now())"
                " FROM webhook_endpoints WHERE id = :e"
            ),
            {"e": added["id"]},
        ).scalar_one()
    time.sleep(max(0.0, min(8.0, float(still_open) - 2)))
    assert attempts_of(db, added["id"]) == before

    shown = hooks(stack, "deliveries", added["id"])
    assert shown[0]["outcome"] == "failed" and shown[0]["status_code"] is None
    assert shown[0]["error"]

    scrape = httpx.get(
        f"{stack.base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).text
    samples = {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
    }
    assert samples[("ferry_webhook_deliveries", (("outcome", "failed_attempt"),))] >= 5
    assert samples[("ferry_webhook_oldest_pending_seconds", ())] > 0
    assert samples[("ferry_webhook_open_circuits", ())] >= 1
    schema = httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json()
    route = schema["paths"]["/v1/dashboard/webhooks"]["get"]
    assert "$ref" in json.dumps(route["responses"]["200"])


def test_an_async_completion_that_ends_is_sent_to_its_callback(
    stack: Stack, db: Engine, receiver: Receiver
) -> None:
    name, key = project(stack)
    model = f"served-{name}"
    with db.begin() as conn:  # as if a worker had served it: requests for it are queued
        conn.execute(text("INSERT INTO served_models (name) VALUES (:m)"), {"m": model})
    endpoint = hooks(
        stack, "add", receiver.url("/project"), "--project", name, "--events", "batch.failed"
    )
    callback = hooks(stack, "callback-secret", "--project", name)
    accepted = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={
            "Authorization": f"Bearer {key}",
            "Prefer": "respond-async",
            "Ferry-Callback-URL": receiver.url("/callback?job=1"),
        },
        timeout=30,
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    with db.connect() as conn:
        row = conn.execute(
            text("SELECT notify, callback_url FROM jobs WHERE id = :j"), {"j": job_id}
        ).one()
    assert row.notify and row.callback_url == receiver.url("/callback?job=1")

    cancelled = httpx.post(
        f"{stack.base_url}/v1/chat/completions/{job_id}/cancel",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert cancelled.status_code == 200, cancelled.text
    (sent,) = receiver.wait(1)
    assert sent["path"] == "/callback?job=1"
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    event = sdk.webhooks.unwrap(sent["body"], sent["headers"], secret=callback["secret"])
    assert (event.type, event.data.id) == ("chat.completion.failed", job_id)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(sent["body"], sent["headers"], secret=endpoint["secret"])
    time.sleep(1)
    assert len(receiver.received) == 1  # the project's endpoint takes batch.failed only
