"""Webhooks through faults on the real stack: the API killed between a batch's end and its
event's delivery, or in the middle of an attempt; Redis restarted empty and Postgres stopped
mid-delivery. Every event still arrives, verified, with one webhook-id however often it comes.

These run last with the other fault tests (see conftest): they kill the session's API (and start
it again, on the same settings), restart Redis empty and stop Postgres.
"""

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from bench.stack import FERRY, Stack
from tests.e2e.test_batches import line, upload
from tests.e2e.test_faults import poll, services, stop_postgres
from tests.e2e.test_webhooks import (
    Team,
    add_endpoint,
    assert_delivered_once_each,
    events_of,
    failed_batch,
    new_team,
    submit_async,
)
from tests.e2e.webhook_receiver import Answer, Receiver, receiving

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


@pytest.fixture
def team(live_worker: Stack) -> Iterator[Team]:
    made = new_team(live_worker)
    yield made
    made.http.close()


def kill_api(stack: Stack) -> None:
    """kill -9 the session's API process (and whatever it started), as a crashed host would."""
    (api,) = [
        p
        for p in stack.processes
        if p.poll() is None and p.args[len(FERRY)] == "api" and str(stack.port) in p.args
    ]
    stack.kill(api)
    stack.processes.remove(api)


def status_of(db: Engine, batch_id: str) -> str:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT status FROM batches WHERE id = :b"), {"b": batch_id}
        ).scalar_one()


def some_events(team: Team, db: Engine, failed: int = 3) -> list:
    """`failed` failed batches and an asynchronous completion: their events, once written."""
    about = {failed_batch(team.client) for _ in range(failed)}
    about.add(submit_async(team.http))
    return poll(  # type: ignore[return-value]
        lambda: (found := events_of(db, team.name)) and {e.about for e in found} == about and found,
        120,
        "the events written",
    )


def test_the_api_killed_as_a_batch_completes_still_sends_its_event(
    live_worker: Stack, team: Team, db: Engine
) -> None:
    stack = live_worker
    # Down when the batch completes, so that no attempt can land before the API dies.
    receiver = Receiver()
    endpoint = add_endpoint(stack, receiver.url(), team.name, events="batch.completed")
    receiver.secrets["endpoint"] = endpoint["secret"]
    try:
        batch = team.client.batches.create(
            input_file_id=upload(team.client, [line("a", max_tokens=2)]).id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        poll(lambda: status_of(db, batch.id) == "completed", 120, "the batch completed", 0.01)
        kill_api(stack)
        # The event was committed with the status: the dead process held nothing of it.
        (event,) = events_of(db, team.name)
        assert (event.type, event.about) == ("batch.completed", batch.id)

        receiver.start()
        stack.start_api()
        receiver.wait_for_events({event.id}, 120)
        assert_delivered_once_each(receiver, [event])
    finally:
        receiver.stop()


def test_the_api_killed_in_an_attempt_sends_it_again(
    live_worker: Stack, team: Team, db: Engine
) -> None:
    stack = live_worker
    with receiving() as receiver:
        # The first attempt is held until after its sender is dead; the next one is answered.
        receiver.answer(Answer(delay=30), default=Answer())
        endpoint = add_endpoint(stack, receiver.url(), team.name, events="batch.failed")
        receiver.secrets["endpoint"] = endpoint["secret"]
        failed_batch(team.client)
        (event,) = events_of(db, team.name)
        receiver.wait_for(lambda r: len(r) == 1, 30, "the first attempt under way")
        kill_api(stack)
        stack.start_api()
        # Its lease runs out, and another sender takes it.
        receiver.wait_for_events({event.id}, 150)
        assert_delivered_once_each(receiver, [event])
        requests = receiver.events()[event.id]
        assert len(requests) >= 2
        assert requests[0].answered is None  # the dead sender never heard it


@contextlib.contextmanager
def under_way(stack: Stack, team: Team, db: Engine) -> Iterator[tuple[Receiver, list]]:
    """A receiver that answers its first 4 requests in 4 s each, an endpoint of the team's for
    it, and events that have begun to be delivered to it."""
    with receiving() as receiver:
        receiver.answer(*[Answer(delay=4)] * 4, default=Answer())
        endpoint = add_endpoint(stack, receiver.url(), team.name)
        receiver.secrets["endpoint"] = endpoint["secret"]
        events = some_events(team, db)
        receiver.wait_for(lambda r: len(r) >= 1, 30, "deliveries under way")
        yield receiver, events


def test_redis_restarted_empty_mid_delivery_loses_nothing(
    live_worker: Stack, team: Team, db: Engine
) -> None:
    stack = live_worker
    # The first attempts are still being answered when Redis goes.
    with under_way(stack, team, db) as (receiver, events):
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, timeout=30)
        time.sleep(2)
        services()  # starts Redis again, empty
        # An event after the restart is sent as well (once the API has its Redis back).
        after = poll(lambda: failed_batch(team.client), 60, "a batch failed after the restart")
        events = poll(
            lambda: (found := events_of(db, team.name)) and len(found) == len(events) + 1 and found,
            30,
            "the event after the restart written",
        )
        assert after in {e.about for e in events}
        receiver.wait_for_events({e.id for e in events}, 150)
        assert_delivered_once_each(receiver, events)
    stack.wait_for_workers(1)


def test_postgres_stopped_mid_delivery_loses_nothing(
    live_worker: Stack, team: Team, db: Engine
) -> None:
    stack = live_worker
    # Answered while Postgres is down: the attempts cannot be recorded when they end.
    with under_way(stack, team, db) as (receiver, events):
        stop_postgres()
        try:
            time.sleep(5)
        finally:
            services()
        poll(
            lambda: team.http.get("/v1/batches", params={"limit": 1}).status_code == 200,
            60,
            "the API recovered",
        )
        receiver.wait_for_events({e.id for e in events}, 180)
        assert_delivered_once_each(receiver, events)
    stack.wait_for_workers(1)
