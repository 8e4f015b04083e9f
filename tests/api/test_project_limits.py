"""Projects' limits on the real stack: `ferry projects` sets them, every API process applies them
within seconds, a request past one is OpenAI's 429 with Retry-After (which the SDK's own retries
honour), every answer carries `x-ratelimit-*` headers, jobs at once are released however they
end, and batches are held against the batch queue limit instead of the per-minute ones."""

import json
import re
import time
import uuid

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from tests.conftest import MODEL
from tests.e2e.test_batches import line, upload, wait_until
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
NO_END = {"0": -100, "2": -100}
RESET = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
HEADERS = {
    f"x-ratelimit-{what}-{kind}"
    for what in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
}


def project(stack: Stack, **limits: str) -> tuple[str, str]:
    """A new project with `limits` (e.g. rpm="2"), and a key of it."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    stack.ferry("projects", "create", name)
    if limits:
        set_limits(stack, name, **limits)
    return name, stack.create_key("limits", project=name)


def set_limits(stack: Stack, name: str, **limits: str) -> str:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in limits.items()]
    return stack.ferry("projects", "limits", name, *flags)


def sdk(stack: Stack, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=retries)


def raw(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def project_jobs(db: Engine, name: str) -> int:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM jobs WHERE project = :p"), {"p": name}
        ).scalar_one()


def throttled(client: httpx.Client) -> dict[str, int]:
    """The key's project's requests refused by its limits so far, by limit, as the dashboard
    shows them."""
    answer = client.get("/v1/dashboard/workers")
    assert answer.status_code == 200, answer.text
    (row,) = answer.json()["projects"]
    assert row["throttled_last_hour"] == row["throttled_total"]  # a new project
    return row["throttled_total"]


def limits_of(client: httpx.Client) -> dict:
    answer = client.get("/v1/projects/me/limits")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "project.limits"
    return next(m for m in body["data"] if m["model"] == MODEL)


def test_requests_per_minute_answer_as_openai_does(live_worker: Stack, db: Engine) -> None:
    name, key = project(live_worker, rpm="3")
    client = sdk(live_worker, key)
    seen = []
    with raw(live_worker, key) as http:
        answer = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HI, max_tokens=2
        )
        seen.append(answer.headers)
        # Asynchronous: 202, with the headers.
        queued = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HI, "max_tokens": 2},
            headers={"Prefer": "respond-async"},
        )
        assert queued.status_code == 202
        seen.append(queued.headers)
        # Streamed: the headers come with the stream's start.
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True},
        ) as streamed:
            assert streamed.status_code == 200
            seen.append(streamed.headers)
            streamed.read()
    for headers, left in zip(seen, ("2", "1", "0"), strict=True):
        # Only the limits the project has: no tokens headers without a TPM limit.
        assert {h for h in HEADERS if h in headers} == {
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        }
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == left
        assert RESET.match(headers["x-ratelimit-reset-requests"])
    before = project_jobs(db, name)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    refused = caught.value.response
    body = refused.json()
    validate("ErrorResponse", body)
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert body["error"]["message"].startswith(
        f"Rate limit reached for {MODEL} in project {name} on requests per min (RPM): Limit 3"
    )
    # A third of a minute refills one request.
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Nothing was stored for it.
    assert project_jobs(db, name) == before

    # The SDK's own retries wait as told, then get through.
    started = time.monotonic()
    patient = sdk(live_worker, key, retries=2)
    done = patient.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert done.choices[0].message.content is not None
    assert time.monotonic() - started < 40

    # Lifted at once (the CLI tells every API process): no limit, no headers.
    set_limits(live_worker, name, rpm="none")
    free = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=2)
    assert not HEADERS & set(free.headers)


def test_tokens_per_minute_count_the_estimate_then_the_usage(live_worker: Stack) -> None:
    _, key = project(live_worker, tpm="1000")
    client = sdk(live_worker, key)
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=500
    )
    # Counted before it ran: its prompt's estimate and all of its max_tokens.
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 500
    assert RESET.match(first.headers["x-ratelimit-reset-tokens"])
    used = first.parse().usage.total_tokens
    # Then corrected to what it used: a request of 900 more fits, which the estimate would not.
    with raw(live_worker, key) as http:
        now = limits_of(http)
        assert now["tpm"] == 1000 and now["rpm"] is None
        assert 1000 - used - 5 <= now["tokens"]["remaining"] <= 1000
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=900)
    with raw(live_worker, key) as http:
        # A long one, counted at its estimate while it runs...
        running = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": LONG, "max_tokens": 800},
            headers={"Prefer": "respond-async"},
        )
        assert running.status_code == 202
        assert int(running.headers["x-ratelimit-remaining-tokens"]) < 200
        # ... leaves too little for another.
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=300)
        http.post(f"/v1/chat/completions/{running.json()['id']}/cancel")
    error = caught.value.response.json()["error"]
    assert error["type"] == "tokens"
    assert "on tokens per min (TPM): Limit 1000" in error["message"]
    assert "Requested 306" in error["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # More than a minute's worth never passes: said so, with no wait to offer.
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1500)
    assert caught.value.response.json()["error"]["message"].startswith("Request too large")
    assert "retry-after" not in caught.value.response.headers
    assert caught.value.response.headers["x-should-retry"] == "false"
    # Both refusals counted, against tokens.
    with raw(live_worker, key) as http:
        assert throttled(http) == {
            "rpm": 0,
            "tpm": 2,
            "max_concurrent": 0,
            "batch_queue_tokens": 0,
            "all": 2,
        }


def test_jobs_at_once_are_released_however_they_end(live_worker: Stack) -> None:
    _, key = project(live_worker, max_concurrent="1")
    client = sdk(live_worker, key)
    with raw(live_worker, key) as http:

        def submit(**body) -> httpx.Response:
            return http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": LONG, "max_tokens": 300, **body},
                headers={"Prefer": "respond-async"},
            )

        running = submit()
        assert running.status_code == 202
        refused = submit()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "queued or running at once" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert limits_of(http)["concurrent"] == 1
        assert throttled(http) == {
            "rpm": 0,
            "tpm": 0,
            "max_concurrent": 1,
            "batch_queue_tokens": 0,
            "all": 1,
        }
        # Cancelled: its place is free (the process that admitted it hears the end).
        cancel = http.post(f"/v1/chat/completions/{running.json()['id']}/cancel")
        assert cancel.status_code == 200
        wait_for(lambda: limits_of(http)["concurrent"] == 0)
        # Asynchronous, ended while nobody waits for it: released all the same.
        short = submit(max_tokens=2, messages=HI)
        assert short.status_code == 202
        wait_for(lambda: limits_of(http)["concurrent"] == 0)
        # Synchronous: released before it is answered, so the next one goes straight in.
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.2)


def test_a_models_own_limits_replace_the_projects(live_worker: Stack) -> None:
    name, key = project(live_worker, rpm="100", tpm="100000")
    shown = set_limits(live_worker, name, model=MODEL, rpm="1")
    # Started from the project-wide row: TPM stays, RPM is its own.
    assert "rpm 1, tpm 100000, max-concurrent none, batch-queue-tokens none" in shown
    listing = live_worker.ferry("projects", "show", name)
    assert "(each model): rpm 100, tpm 100000" in listing
    assert f"{MODEL}: rpm 1, tpm 100000" in listing
    client = sdk(live_worker, key)
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)


def test_keys_without_limits_are_not_limited(live_worker: Stack, api_key: str) -> None:
    answer = sdk(live_worker, api_key).chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=2
    )
    assert not HEADERS & set(answer.headers)
    with raw(live_worker, api_key) as http:
        mine = limits_of(http)
    assert mine["rpm"] is None and mine["requests"] is None and mine["concurrent"] is None
    assert mine["batch_queue"] == {"limit": None, "in_use": 0, "free": None}


def test_batches_are_held_against_the_batch_queue_not_per_minute(live_worker: Stack) -> None:
    name, key = project(live_worker, rpm="1", batch_queue_tokens="100")
    client = sdk(live_worker, key)
    # 4 lines of 40 tokens and their prompts (59 each): more than 100.
    lines = [line(f"r{i}", LONG[0]["content"], max_tokens=40) for i in range(4)]
    too_big = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    failed = wait_until(client, too_big.id, {"failed", "completed"})
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    error = failed.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert error.message is not None
    assert error.message.startswith(f"Enqueued token limit reached for {MODEL} in project {name}")
    assert "Limit: 100 enqueued tokens" in error.message
    needs = re.search(r"this batch needs ([\d,]+)", error.message)
    assert needs is not None, error.message
    prompt = int(needs[1].replace(",", "")) // 4 - 40  # each line: its prompt and max_tokens

    set_limits(live_worker, name, batch_queue_tokens="100000")
    with raw(live_worker, key) as http:
        # The batch counts once among the project's refusals, named by the limit.
        assert throttled(http)["batch_queue_tokens"] == throttled(http)["all"] == 1
        assert limits_of(http)["batch_queue"] == {"limit": 100000, "in_use": 0, "free": 100000}
        # Lines that run for seconds (no end of text before their max_tokens): seen in progress.
        answer = 120
        running = [
            line(f"r{i}", LONG[0]["content"], max_tokens=answer, logit_bias=NO_END)
            for i in range(4)
        ]
        batch = client.batches.create(
            input_file_id=upload(client, running).id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        # While it runs it holds its estimate (or what its unfinished lines' share is).
        held = []
        while (now := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
            in_use = limits_of(http)["batch_queue"]["in_use"]
            if client.batches.retrieve(batch.id).status == "in_progress":
                held.append(in_use)
            time.sleep(0.1)
        assert now.status == "completed"
        # Four lines though the project may send one request a minute.
        assert now.request_counts is not None and now.request_counts.completed == 4
        # Each line holds its prompt and its max_tokens at most.
        assert held and all(h <= 4 * (prompt + answer) for h in held), held
        assert any(h > 0 for h in held), held
        # Released once it ended.
        assert limits_of(http)["batch_queue"]["in_use"] == 0
        # Its lines did not count against the minute: the one request still goes.
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert throttled(http)["all"] == 1


def test_the_limits_endpoint_is_in_the_openapi_document(stack: Stack) -> None:
    document = httpx.get(f"{stack.base_url}/openapi.json").json()
    assert "/v1/projects/me/limits" in document["paths"]
    create = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "429" in create
    assert json.dumps(create["429"])
