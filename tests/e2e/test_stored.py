"""Stored completions, asynchronous submission and polling, cancellation, idempotency, and keys
that own their data: through the official SDK and raw HTTP, on the real stack."""

import threading
import time
import uuid

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from tests.api.test_api_errors import assert_envelope
from tests.conftest import MODEL
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Say hi."}]


def tag() -> str:
    return uuid.uuid4().hex[:12]


def make(client: openai.OpenAI, **fields):
    return client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, **fields)


def row(db: Engine, job_id: str):
    with db.connect() as conn:
        return conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).one()


@pytest.fixture
def other_client(live_worker: Stack) -> openai.OpenAI:
    """A key of another project."""
    key = live_worker.create_key("other", project=f"other-{tag()}")
    return openai.OpenAI(base_url=f"{live_worker.base_url}/v1", api_key=key, max_retries=0)


def test_stored_completions_through_the_sdk(client: openai.OpenAI, http: httpx.Client) -> None:
    run = tag()
    made = [
        make(client, store=True, metadata={"run": run, "kind": "odd" if i % 2 else "even"})
        for i in range(5)
    ]
    make(client, store=True, metadata={"run": "elsewhere"})

    listed = list(client.chat.completions.list(metadata={"run": run}, model=MODEL, limit=2))
    assert [c.id for c in listed] == [c.id for c in made]
    evens = client.chat.completions.list(metadata={"run": run, "kind": "even"}, limit=100)
    assert [c.id for c in evens] == [made[0].id, made[2].id, made[4].id]
    newest = client.chat.completions.list(metadata={"run": run}, order="desc", limit=1)
    assert newest.data[0].id == made[-1].id and newest.has_more

    page = http.get("/v1/chat/completions", params={"metadata[run]": run, "limit": 2}).json()
    validate("ChatCompletionList", page)
    assert page["first_id"] == made[0].id and page["last_id"] == made[1].id
    assert page["has_more"] is True

    got = client.chat.completions.retrieve(made[0].id)
    assert got.choices[0].message.content == made[0].choices[0].message.content
    assert got.metadata == {"run": run, "kind": "even"}
    validate("CreateChatCompletionResponse", http.get(f"/v1/chat/completions/{made[0].id}").json())

    updated = client.chat.completions.update(made[0].id, metadata={"run": run, "kind": "odd"})
    assert updated.metadata == {"run": run, "kind": "odd"}
    odds = client.chat.completions.list(metadata={"run": run, "kind": "odd"}, limit=100)
    assert made[0].id in [c.id for c in odds]

    messages = client.chat.completions.messages.list(made[0].id)
    assert [(m.role, m.content) for m in messages] == [("user", "Say hi.")]
    raw = http.get(f"/v1/chat/completions/{made[0].id}/messages").json()
    assert raw["data"][0]["id"] == f"{made[0].id}-0"
    # The spec reuses the response message for these items, which names only the assistant
    # role; its own example (and OpenAI) carry the request's roles. Checked but for that enum.
    validate(
        "ChatCompletionMessageList",
        {**raw, "data": [{**m, "role": "assistant"} for m in raw["data"]]},
    )

    deleted = client.chat.completions.delete(made[1].id)
    assert deleted.deleted and deleted.id == made[1].id
    validate("ChatCompletionDeleted", deleted.model_dump())
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(made[1].id)
    assert made[1].id not in [c.id for c in client.chat.completions.list(metadata={"run": run})]


def test_lists_stay_correct_while_completions_arrive(client: openai.OpenAI) -> None:
    run = tag()
    first = [make(client, store=True, metadata={"run": run}) for _ in range(3)]
    page = client.chat.completions.list(metadata={"run": run}, limit=2)
    later = [make(client, store=True, metadata={"run": run}) for _ in range(2)]
    seen = [c.id for c in page.data]
    while page.has_more:
        page = client.chat.completions.list(metadata={"run": run}, limit=2, after=page.data[-1].id)
        seen += [c.id for c in page.data]
    assert seen == [c.id for c in first + later]


def test_store_false_keeps_no_content_after_delivery(
    client: openai.OpenAI, db: Engine, http: httpx.Client
) -> None:
    run = tag()
    completion = make(client, metadata={"run": run})  # store defaults to false
    time.sleep(0.5)  # the purge runs just after the answer is sent
    job = row(db, completion.id)
    assert job.request is None and job.response is None
    assert job.status == "succeeded" and job.total_tokens == completion.usage.total_tokens
    assert client.chat.completions.list(metadata={"run": run}).data == []
    assert_envelope(http.get(f"/v1/chat/completions/{completion.id}"), 404, "completion_id")

    events = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2, stream=True, metadata={"run": run}
    )
    streamed_id = {event.id for event in events}.pop()
    time.sleep(0.5)
    job = row(db, streamed_id)
    assert job.request is None and job.response is None and job.status == "succeeded"


def test_async_submission_and_polling(live_worker: Stack, http: httpx.Client, db: Engine) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 4}
    accepted = http.post("/v1/chat/completions", json=body, headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    queued = accepted.json()
    assert queued["status"] == "queued" and queued["id"].startswith("chatcmpl-")
    assert accepted.headers["location"] == f"/v1/chat/completions/{queued['id']}"

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        polled = http.get(accepted.headers["location"]).json()
        assert polled["status"] in ("queued", "running", "succeeded")
        if polled["status"] == "succeeded":
            break
        time.sleep(0.2)
    validate("CreateChatCompletionResponse", polled)
    assert polled["choices"][0]["message"]["content"]
    # store false: the final poll was the delivery; after it the content is gone.
    time.sleep(0.5)
    assert row(db, queued["id"]).response is None
    assert_envelope(http.get(accepted.headers["location"]), 404, "completion_id")


def test_cancel_a_running_job(http: httpx.Client, db: Engine, client: openai.OpenAI) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
        "max_tokens": 1500,
        "temperature": 1.0,
        "store": True,
    }
    job_id = http.post(URL, json=body, headers={"Prefer": "respond-async"}).json()["id"]
    deadline = time.monotonic() + 30
    while row(db, job_id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    cancelled = http.post(f"{URL}/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    time.sleep(2)  # the worker aborts it in the engine; nothing is written after the cancel
    job = row(db, job_id)
    assert job.status == "cancelled" and job.response is None
    assert_envelope(http.post(f"{URL}/{job_id}/cancel"), 409, "completion_id", "conflict")
    # The engine is free again.
    assert make(client).choices[0].message.content is not None


URL = "/v1/chat/completions"


def test_idempotency_key_makes_one_job(http: httpx.Client, db: Engine) -> None:
    key = f"idem-{tag()}"
    body = {"model": MODEL, "messages": HI, "max_tokens": 3}
    headers = {"Idempotency-Key": key}
    results = []

    def post() -> None:
        results.append(http.post(URL, json=body, headers=headers))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.append(http.post(URL, json=body, headers=headers))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert len({r.json()["choices"][0]["message"]["content"] for r in results}) == 1
    with db.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key}
        ).scalar_one()
    assert count == 1

    other = http.post(URL, json={**body, "max_tokens": 4}, headers=headers)
    assert_envelope(other, 409, code="idempotency_key_reused")


def test_sdk_retry_with_idempotency_key_costs_nothing(client: openai.OpenAI, db: Engine) -> None:
    key = f"idem-{tag()}"
    one = make(client, extra_headers={"Idempotency-Key": key})
    two = make(client, extra_headers={"Idempotency-Key": key})
    assert one.id == two.id


def test_keys_own_their_data(
    client: openai.OpenAI, other_client: openai.OpenAI, http: httpx.Client
) -> None:
    run = tag()
    mine = make(client, store=True, metadata={"run": run})
    theirs = make(other_client, store=True, metadata={"run": run})
    assert [c.id for c in client.chat.completions.list(metadata={"run": run})] == [mine.id]
    assert [c.id for c in other_client.chat.completions.list(metadata={"run": run})] == [theirs.id]
    for call in (
        lambda: other_client.chat.completions.retrieve(mine.id),
        lambda: other_client.chat.completions.update(mine.id, metadata={"x": "y"}),
        lambda: other_client.chat.completions.delete(mine.id),
        lambda: other_client.chat.completions.messages.list(mine.id),
        lambda: other_client.post(f"/chat/completions/{mine.id}/cancel", cast_to=dict),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.chat.completions.retrieve(mine.id).id == mine.id


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"limit": 0}, "limit", "integer_below_min_value"),
        ({"limit": 101}, "limit", "integer_above_max_value"),
        ({"order": "sideways"}, "order", "invalid_value"),
        ({"metadata[k]": "v" * 513}, "metadata.k", "string_above_max_length"),
        ({"metadata[" + "k" * 65 + "]": "v"}, "metadata." + "k" * 65, "string_above_max_length"),
        # A filter is `metadata[key]=value`: anything else named metadata is refused, not ignored.
        ({"metadata": ""}, "metadata", "invalid_type"),
        ({"metadata": "k"}, "metadata", "invalid_type"),
        ({"metadata]": "v"}, "metadata", "invalid_value"),
        ({"metadata[k": "v"}, "metadata", "invalid_value"),
        ({"metadata[k][j]": "v"}, "metadata", "invalid_value"),
        ({"metadata.k": "v"}, "metadata", "invalid_value"),
        ([("metadata[k]", "v"), ("metadata[k]", "w")], "metadata.k", "invalid_value"),
    ],
)
def test_bad_list_queries(http: httpx.Client, params, param, code) -> None:
    assert_envelope(http.get(URL, params=params), 400, param, code)


def test_unknown_ids_and_bad_updates(http: httpx.Client, client: openai.OpenAI) -> None:
    assert_envelope(http.get(f"{URL}/chatcmpl-nope"), 404, "completion_id")
    assert_envelope(http.get(f"{URL}/chatcmpl-nope/messages"), 404, "completion_id")
    assert_envelope(http.delete(f"{URL}/chatcmpl-nope"), 404, "completion_id")
    assert_envelope(http.get(URL, params={"after": "chatcmpl-nope"}), 404, "completion_id")
    stored = make(client, store=True)
    assert_envelope(
        http.post(f"{URL}/{stored.id}", json={}), 400, "metadata", "missing_required_parameter"
    )
    assert_envelope(
        http.post(f"{URL}/{stored.id}", json={"metadata": {"k": "v" * 513}}),
        400,
        "metadata.k",
        "string_above_max_length",
    )
    assert_envelope(
        http.get(f"{URL}/{stored.id}/messages", params={"limit": 0}),
        400,
        "limit",
        "integer_below_min_value",
    )
