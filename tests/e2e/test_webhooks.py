"""Webhooks on the real stack, received by a real HTTP server in the test (webhook_receiver) that
verifies every request with the `openai` SDK: each batch's end and each asynchronous completion
is one signed event, delivered at least once, retried, recorded, and never held up by another
endpoint. Each test has a project of its own, so it sees only its own events."""

import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import psutil
import pytest
from sqlalchemy import Engine, text
from standardwebhooks.webhooks import Webhook

from api.webhooks import PER_ENDPOINT
from bench.stack import FERRY, Stack, free_port
from tests.conftest import MODEL
from tests.e2e.test_batches import line, run_to_end, upload, wait_until
from tests.e2e.test_faults import NO_END, poll
from tests.e2e.webhook_receiver import Answer, Receiver, receiving, unwrap
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e

ESSAY = "Write a long story about the sea."
SCHEMAS = {
    "batch.completed": "WebhookBatchCompleted",
    "batch.failed": "WebhookBatchFailed",
    "batch.expired": "WebhookBatchExpired",
    "batch.cancelled": "WebhookBatchCancelled",
}


@dataclass
class Team:
    """A project of its own, a key of it, and clients with that key."""

    name: str
    client: openai.OpenAI
    http: httpx.Client


def new_team(stack: Stack) -> Team:
    """A new project, a key of it, and clients with that key (close its `http`)."""
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    stack.ferry("projects", "create", name)
    key = stack.create_key("hooks", project=name)
    return Team(
        name,
        openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0),
        httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ),
    )


@pytest.fixture
def teams(live_worker: Stack) -> Iterator[Callable[[], Team]]:
    """Make a new project (and its clients) each call."""
    made: list[Team] = []

    def make() -> Team:
        made.append(new_team(live_worker))
        return made[-1]

    yield make
    for team in made:
        team.http.close()


def webhooks(stack: Stack, *args: str) -> Any:
    """`ferry webhooks ARGS --json`, parsed."""
    return json.loads(stack.ferry("webhooks", *args, "--json"))


def add_endpoint(stack: Stack, url: str, project: str, events: str | None = None) -> dict:
    flags = ["--events", events] if events else []
    added = webhooks(stack, "add", url, "--project", project, *flags)
    assert added["id"].startswith("we_") and added["secret"].startswith("whsec_"), added
    assert (added["url"], added["project"]) == (url, project)
    return added


def long_lines(tag: str) -> list[str]:
    """Lines that run to their max_tokens: a batch of them is still running a while later."""
    return [line(f"{tag}-{i}", ESSAY, max_tokens=100, logit_bias=NO_END) for i in range(4)]


def events_of(db: Engine, project: str) -> list:
    """The project's events as written: id, type, what it is about, payload."""
    with db.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, type, payload->'data'->>'id' AS about, payload,"
                    " extract(epoch FROM created_at) AS at"
                    " FROM webhook_events WHERE project = :p ORDER BY created_at, id"
                ),
                {"p": project},
            ).all()
        )


def failed_batch(client: openai.OpenAI) -> str:
    """A batch none of whose lines is valid: it fails in the API, with no worker involved."""
    batch = client.batches.create(
        input_file_id=upload(client, ["not json"]).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert wait_until(client, batch.id, {"failed", "completed"}, 60).status == "failed"
    return batch.id


def submit_async(
    http: httpx.Client, headers: dict[str, str] | None = None, content: str = "Say hi.", **body
) -> str:
    """An asynchronous completion (`Prefer: respond-async`); its id."""
    accepted = http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 2,
            **body,
        },
        headers={"Prefer": "respond-async", **(headers or {})},
    )
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


def job_status(db: Engine, job_id: str) -> str:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id}
        ).scalar_one()


def attempts_of(db: Engine, endpoint_id: str) -> list:
    with db.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT d.event_id, a.attempt, a.status_code, a.error, a.duration_ms,"
                    " octet_length(a.response_body) AS kept, a.response_body"
                    " FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
                    " WHERE d.endpoint_id = :e ORDER BY a.id"
                ),
                {"e": endpoint_id},
            ).all()
        )


def assert_delivered_once_each(receiver: Receiver, events: list, secret: str = "endpoint") -> None:
    """Every event arrived, verified, as written; nothing else arrived (at-least-once: repeats
    carry the same webhook-id and body)."""
    arrived = receiver.events()
    assert set(arrived) == {event.id for event in events}
    for event in events:
        requests = arrived[event.id]
        assert any(r.delivered for r in requests)
        for request in requests:
            assert request.verified[secret], (event.id, request.headers)
            assert request.payload == event.payload
            assert request.body == requests[0].body


def test_each_end_of_a_batch_is_one_verified_event(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    with receiving() as receiver:
        endpoint = add_endpoint(stack, receiver.url(), team.name)
        receiver.secrets["endpoint"] = endpoint["secret"]
        client = team.client

        completed = run_to_end(client, [line("a", max_tokens=2), line("b", max_tokens=2)])
        assert completed.status == "completed"
        failed = failed_batch(client)

        cancelled = client.batches.create(
            input_file_id=upload(client, long_lines("c")).id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_until(client, cancelled.id, {"in_progress"})
        client.batches.cancel(cancelled.id)
        wait_until(client, cancelled.id, {"cancelled"})

        expired = client.batches.create(
            input_file_id=upload(client, long_lines("e")).id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_until(client, expired.id, {"in_progress"})
        with db.begin() as conn:  # as if 24 hours had passed
            conn.execute(
                text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :b"),
                {"b": expired.id},
            )
        wait_until(client, expired.id, {"expired"})

        events = events_of(db, team.name)
        assert sorted((e.type, e.about) for e in events) == sorted(
            [
                ("batch.completed", completed.id),
                ("batch.failed", failed),
                ("batch.cancelled", cancelled.id),
                ("batch.expired", expired.id),
            ]
        )
        receiver.wait_for_events({e.id for e in events}, 60)
        time.sleep(1)  # room for a second delivery of any of them, had one been sent
        assert_delivered_once_each(receiver, events)
        arrived = receiver.events()

    for event in events:
        (request,) = arrived[event.id]  # a receiver that answers 200 is sent each once
        assert event.id.startswith("evt_") and request.webhook_id == event.id
        validate(SCHEMAS[event.type], request.payload)
        assert request.payload["object"] == "event"
        assert request.payload["data"] == {"id": event.about}
        sent_at = int(request.headers["webhook-timestamp"])
        assert abs(sent_at - request.at) < 5
        unwrapped = unwrap(request.body, request.headers, endpoint["secret"])
        assert (unwrapped.type, unwrapped.data.id) == (event.type, event.about)
        assert unwrapped.id == event.id
        # The event's time is the batch's end (completed_at, failed_at, ...).
        batch = client.batches.with_raw_response.retrieve(event.about).http_response.json()
        ended = batch[event.type.removeprefix("batch.") + "_at"]
        assert abs(request.payload["created_at"] - ended) <= 1, (request.payload, batch)

    request = arrived[events[0].id][0]
    secret = endpoint["secret"]
    # A tampered body fails, and so does another secret.
    tampered = request.body.replace(events[0].about.encode(), b"batch_someone_else")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(tampered, request.headers, secret)
    other = "whsec_" + "QUJD" * 8
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(request.body, request.headers, other)
    # A timestamp 10 minutes old fails although its signature is right; signed now, it passes.
    body = request.body.decode()

    def signed_at(when: datetime) -> dict[str, str]:
        return {
            **request.headers,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(request.webhook_id, when, body),
        }

    old = datetime.fromtimestamp(time.time() - 600, UTC)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        unwrap(request.body, signed_at(old), secret)
    assert unwrap(request.body, signed_at(datetime.now(UTC)), secret).id == request.webhook_id


def test_async_completions_go_to_the_projects_endpoints_and_their_own_callback(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    with receiving() as receiver:
        endpoint = add_endpoint(
            stack,
            receiver.url("/project"),
            team.name,
            events="chat.completion.completed,chat.completion.failed",
        )
        assert endpoint["events"] == ["chat.completion.completed", "chat.completion.failed"]
        batches_only = add_endpoint(stack, receiver.url("/batches"), team.name, "batch.completed")
        callback = webhooks(stack, "callback-secret", "--project", team.name)
        assert callback["project"] == team.name and callback["secret"].startswith("whsec_")
        receiver.secrets = {"endpoint": endpoint["secret"], "callback": callback["secret"]}

        listed = {e["id"]: e for e in webhooks(stack, "list", "--project", team.name)}
        assert set(listed) == {endpoint["id"], batches_only["id"]}
        assert listed[batches_only["id"]]["events"] == ["batch.completed"]
        assert listed[endpoint["id"]]["consecutive_failures"] == 0

        # A completion the client waits for is no event.
        team.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=2
        )
        plain = submit_async(team.http)
        called = submit_async(team.http, {"Ferry-Callback-URL": receiver.url("/callback/one")})
        # One that does not end well: cancelled while it runs.
        cancelled = submit_async(team.http, content=ESSAY, max_tokens=300, logit_bias=NO_END)
        poll(lambda: job_status(db, cancelled) == "running", 60, "the essay running")
        answer = team.http.post(f"/v1/chat/completions/{cancelled}/cancel")
        assert answer.status_code == 200, answer.text
        events = poll(
            lambda: (found := events_of(db, team.name)) and len(found) == 3 and found,
            120,
            "the three completions' events",
        )
        assert sorted((e.type, e.about) for e in events) == sorted(
            [
                ("chat.completion.completed", plain),
                ("chat.completion.completed", called),
                ("chat.completion.failed", cancelled),
            ]
        )
        by_about = {e.about: e for e in events}

        def all_in(requests: list) -> bool:
            ok = {(r.path, r.webhook_id) for r in requests if r.delivered}
            return {
                ("/project", by_about[plain].id),
                ("/project", by_about[called].id),
                ("/project", by_about[cancelled].id),
                ("/callback/one", by_about[called].id),
            } <= ok

        receiver.wait_for(all_in, 60, "each event at the project's endpoint and the callback")
        time.sleep(1)
        requests = receiver.requests()

        # Sent again, it goes to the endpoint and to the callback URL, each signed as before.
        again = webhooks(stack, "redeliver", by_about[called].id)
        assert again == {"event_id": by_about[called].id, "deliveries": 2}
        receiver.wait_for(
            lambda r: (
                len([x for x in r if x.webhook_id == by_about[called].id and x.delivered]) == 4
            ),
            30,
            "the redelivery to both",
        )
        resent = receiver.requests()[len(requests) :]
        assert sorted(r.path for r in resent) == ["/callback/one", "/project"]
        requests += resent

    assert Counter(r.path for r in requests) == {"/project": 4, "/callback/one": 2}
    for request in requests:
        event = next(e for e in events if e.id == request.webhook_id)
        assert request.payload == event.payload
        assert request.payload["object"] == "event"
        assert request.payload["data"] == {"id": event.about}
        # Each is signed with its own secret alone.
        signed_by = "callback" if request.path == "/callback/one" else "endpoint"
        assert request.verified == {
            "endpoint": signed_by == "endpoint",
            "callback": signed_by == "callback",
        }
        unwrapped = unwrap(request.body, request.headers, receiver.secrets[signed_by])
        assert (unwrapped.type, unwrapped.data.id) == (event.type, event.about)


def test_after_a_rotation_both_secrets_verify_during_the_grace(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    with receiving() as receiver:
        endpoint = add_endpoint(stack, receiver.url(), team.name, events="batch.failed")
        rotated = webhooks(stack, "rotate", endpoint["id"], "--grace", "1h")
        assert rotated["id"] == endpoint["id"]
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != endpoint["secret"]
        expires = rotated["previous_secret_expires_at"]
        expires = (
            expires
            if isinstance(expires, int | float)
            else datetime.fromisoformat(expires).timestamp()
        )
        assert abs(expires - (time.time() + 3600)) < 120
        receiver.secrets = {"old": endpoint["secret"], "new": rotated["secret"]}

        during = failed_batch(team.client)
        (event,) = events_of(db, team.name)
        receiver.wait_for_events({event.id}, 30)
        assert event.about == during
        (request,) = receiver.events()[event.id]
        assert request.verified == {"old": True, "new": True}

        # The grace over (as if an hour had passed), only the new secret signs.
        with db.begin() as conn:
            conn.execute(
                text(
                    "UPDATE webhook_endpoints SET previous_secret_until = now() - interval '1 s'"
                    " WHERE id = :e"
                ),
                {"e": endpoint["id"]},
            )
        after = failed_batch(team.client)
        event = next(e for e in events_of(db, team.name) if e.about == after)
        receiver.wait_for_events({event.id}, 30)
        (request,) = receiver.events()[event.id]
        assert request.verified == {"old": False, "new": True}

        # Removed, the endpoint is sent nothing more: with no endpoint, no event is written.
        webhooks(stack, "remove", endpoint["id"])
        assert webhooks(stack, "list", "--project", team.name) == []
        gone = failed_batch(team.client)
        time.sleep(2)
        assert [e for e in events_of(db, team.name) if e.about == gone] == []
        assert len(receiver.requests()) == 2

        # The project's callback secret rotates the same way: `callback-secret` again.
        first = webhooks(stack, "callback-secret", "--project", team.name)
        second = webhooks(stack, "callback-secret", "--project", team.name, "--grace", "1h")
        assert second["secret"] != first["secret"]
        receiver.secrets = {"old": first["secret"], "new": second["secret"]}
        called = submit_async(team.http, {"Ferry-Callback-URL": receiver.url("/callback")})
        event = poll(
            lambda: next((e for e in events_of(db, team.name) if e.about == called), None),
            60,
            "the completion's event",
        )
        receiver.wait_for_events({event.id}, 30)
        (request,) = receiver.events()[event.id]
        assert request.path == "/callback"
        assert request.verified == {"old": True, "new": True}


def test_a_receiver_down_for_a_while_gets_every_event_when_it_is_back(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    receiver = Receiver()  # not started: its port refuses connections
    endpoint = add_endpoint(stack, receiver.url(), team.name)
    receiver.secrets["endpoint"] = endpoint["secret"]
    try:
        # A batch completes (and others end) while nobody listens.
        completed = run_to_end(team.client, [line("a", max_tokens=2)])
        assert completed.status == "completed"
        failed = [failed_batch(team.client) for _ in range(2)]
        completion = submit_async(team.http)
        events = poll(
            lambda: (found := events_of(db, team.name)) and len(found) == 4 and found,
            120,
            "the four events written",
        )
        assert {e.about for e in events} == {completed.id, completion, *failed}

        # Every attempt fails until the breaker opens.
        def open_circuit() -> dict | None:
            (listed,) = webhooks(stack, "list", "--project", team.name)
            return listed if listed["consecutive_failures"] >= 5 else None

        listed = poll(open_circuit, 90, "the endpoint's circuit open", every=1)
        assert listed["circuit"] == "open", listed
        failures = attempts_of(db, endpoint["id"])
        assert len(failures) >= 5
        assert all(a.status_code is None and a.error for a in failures), failures
        # As if it had been down for minutes: the backoff has grown, the next tries are far off.
        with db.begin() as conn:
            conn.execute(
                text(
                    "UPDATE webhook_deliveries SET next_attempt_at = now() + interval '20 minutes'"
                    " WHERE endpoint_id = :e AND status = 'pending'"
                ),
                {"e": endpoint["id"]},
            )

        receiver.start()
        back = time.time()
        # The circuit's probe finds it back, and what waited is sent at once.
        receiver.wait_for_events({e.id for e in events}, 90)
        took = max(min(r.at for r in rs if r.delivered) for rs in receiver.events().values())
        print(f"\nevery missed event arrived {took - back:.1f} s after the receiver came back")
        assert_delivered_once_each(receiver, events)
        listed = poll(
            lambda: (
                (row := webhooks(stack, "list", "--project", team.name)[0])
                and row["consecutive_failures"] == 0
                and row
            ),
            10,
            "the endpoint's failures reset",
        )
        assert listed["circuit"] == "closed", listed
    finally:
        receiver.stop()


def test_a_slow_receiver_does_not_hold_up_another(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack = live_worker
    busy, team = teams(), teams()
    with receiving() as slow, receiving() as fast:
        slow.answer(default=Answer(delay=10))
        slow_endpoint = add_endpoint(stack, slow.url("/busy"), busy.name)
        add_endpoint(stack, slow.url("/also"), team.name)
        endpoint = add_endpoint(stack, fast.url(), team.name)
        fast.secrets["endpoint"] = endpoint["secret"]
        for _ in range(6):
            failed_batch(busy.client)
        slow.wait_for(lambda r: len(r) >= 4, 30, "the slow receiver answering several")

        about = failed_batch(team.client)
        (event,) = events_of(db, team.name)
        assert event.about == about
        fast.wait_for_events({event.id}, 10)
        (request,) = fast.events()[event.id]
        assert request.verified["endpoint"]
        # Within seconds of the event's commit, while the slow receiver still holds requests.
        assert request.at - float(event.at) < 3, request.at - float(event.at)
        assert slow.answering > 0

        # The slow receiver's attempts end by the sender's limit of 10 s each.
        recorded = poll(
            lambda: (found := attempts_of(db, slow_endpoint["id"])) and len(found) >= 4 and found,
            30,
            "the slow attempts recorded",
        )
        assert all(a.duration_ms < 11_000 for a in recorded), [a.duration_ms for a in recorded]


def test_every_attempt_is_recorded_redirects_are_not_followed_and_redeliver_sends_again(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    with receiving() as receiver, receiving() as elsewhere:
        receiver.answer(
            Answer(302, b"", headers={"location": elsewhere.url("/moved")}),
            Answer(500, b"x" * 5000),
            Answer(500, "\u20ac".encode() * 2000),  # 3 bytes each: 1 KiB cuts one in two
            default=Answer(202, b"thanks"),  # any 2xx delivers
        )
        endpoint = add_endpoint(stack, receiver.url(), team.name)
        receiver.secrets["endpoint"] = endpoint["secret"]
        about = failed_batch(team.client)
        (event,) = events_of(db, team.name)
        assert event.about == about
        receiver.wait_for_events({event.id}, 90)

        requests = receiver.events()[event.id]
        assert [r.answered for r in requests] == [302, 500, 500, 202]
        assert all(r.verified["endpoint"] for r in requests)
        assert len({r.body for r in requests}) == 1
        assert elsewhere.requests() == []  # the redirect was not followed

        shown = poll(
            lambda: (
                (
                    rows := [
                        d
                        for d in webhooks(stack, "deliveries", endpoint["id"])
                        if d["event_id"] == event.id
                    ]
                )
                and len(rows) == 4
                and rows
            ),
            10,
            "four attempts shown",
        )
        shown = sorted(shown, key=lambda d: d["attempt"])
        assert [(d["attempt"], d["status_code"]) for d in shown] == [
            (1, 302),
            (2, 500),
            (3, 500),
            (4, 202),
        ]
        assert {d["type"] for d in shown} == {"batch.failed"}
        assert [d["outcome"] == "delivered" for d in shown] == [False, False, False, True]
        assert all(d["started_at"] for d in shown)

        recorded = attempts_of(db, endpoint["id"])
        assert [a.status_code for a in recorded] == [302, 500, 500, 202]
        assert recorded[1].response_body == "x" * 1024
        assert recorded[3].response_body == "thanks"

        again = webhooks(stack, "redeliver", event.id)
        assert again == {"event_id": event.id, "deliveries": 1}
        receiver.wait_for(
            lambda r: len([x for x in r if x.webhook_id == event.id]) == 5, 30, "the redelivery"
        )
        resent = receiver.events()[event.id][-1]
        assert resent.delivered and resent.verified["endpoint"]
        assert resent.body == requests[0].body
        time.sleep(1)
        assert len(receiver.events()[event.id]) == 5
    # At most 1 KiB of each answer is kept, in bytes, a character cut in two included.
    assert all(a.kept is None or a.kept <= 1024 for a in recorded), [a.kept for a in recorded]


def test_two_api_processes_send_each_event_once(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    # A second API process beside the session's: two senders race for every delivery.
    second = stack.start_api_on(free_port(), "api-webhooks")
    try:
        with receiving() as receiver:
            endpoint = add_endpoint(stack, receiver.url(), team.name)
            receiver.secrets["endpoint"] = endpoint["secret"]
            for _ in range(8):
                failed_batch(team.client)
            events = events_of(db, team.name)
            assert len(events) == 8
            receiver.wait_for_events({e.id for e in events}, 60)
            time.sleep(2)
            assert_delivered_once_each(receiver, events)
            assert Counter(r.webhook_id for r in receiver.requests()) == {e.id: 1 for e in events}
    finally:
        second.terminate()
        second.wait(30)
        stack.processes.remove(second)


def sending(process: subprocess.Popen, receiver: Receiver) -> bool:
    """Whether the process has a connection open to the receiver: an attempt under way."""
    return any(
        c.raddr and c.raddr.port == receiver.port
        for c in psutil.Process(process.pid).net_connections("tcp")
    )


def test_an_api_process_killed_in_its_attempts_leaves_them_to_another(
    live_worker: Stack, teams: Callable[[], Team], db: Engine
) -> None:
    stack, team = live_worker, teams()
    # Every API process sends (the session's, this one, any another test left running), each
    # at most api.webhooks.PER_ENDPOINT deliveries of one endpoint at once: while as many as
    # they can take are held, each holds its share, this one among them.
    second = stack.start_api_on(free_port(), "api-webhooks-killed")
    try:
        with receiving() as receiver:
            senders = [
                p for p in stack.processes if p.poll() is None and p.args[len(FERRY)] == "api"
            ]
            count = len(senders) * PER_ENDPOINT
            # Held, but answered within the sender's 10 s; the attempts after them at once.
            receiver.answer(*[Answer(delay=8)] * count, default=Answer())
            endpoint = add_endpoint(stack, receiver.url(), team.name, events="batch.failed")
            receiver.secrets["endpoint"] = endpoint["secret"]
            files = [upload(team.client, ["not json"]).id for _ in range(count)]
            for file_id in files:
                team.client.batches.create(
                    input_file_id=file_id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
            receiver.wait_for(lambda r: len(r) == count, 6, "every first attempt under way")
            poll(lambda: sending(second, receiver), 5, "the second API process sending")
            stack.kill(second)  # kill -9, its attempts in the middle
            events = poll(
                lambda: (found := events_of(db, team.name)) and len(found) == count and found,
                10,
                "the events written",
            )
            # Another process sends what the dead one held, once its lease has run out.
            receiver.wait_for_events({e.id for e in events}, 120)
            assert_delivered_once_each(receiver, events)
            arrived = receiver.events()
            cut = [i for i, (first, *_) in arrived.items() if first.answered is None]
            answered = [i for i, (first, *_) in arrived.items() if first.delivered]
            assert cut and answered and len(cut) + len(answered) == count, receiver.requests()
            for event_id in cut:
                assert len(arrived[event_id]) == 2 and arrived[event_id][1].delivered
            for event_id in answered:
                assert len(arrived[event_id]) == 1
    finally:
        if second.poll() is None:
            stack.kill(second)
        stack.processes.remove(second)
