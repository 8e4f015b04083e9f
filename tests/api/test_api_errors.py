"""Bad input and bad keys: each gets its status and OpenAI's error envelope, and nothing runs."""

import time

import httpx
import openai
import pytest
import redis
from sqlalchemy import Engine, text

from bench.stack import Stack
from core.queue import queue_for
from core.settings import ApiSettings
from tests.conftest import MODEL
from tests.openai_schema import validate

URL = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_envelope(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    assert error["code"] == code
    return error


def count_jobs(db: Engine) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": MODEL}, "messages", "missing_required_parameter"),
        ({"messages": GOOD["messages"]}, "model", "missing_required_parameter"),
        ({**GOOD, "messages": []}, "messages", "empty_array"),
        ({**GOOD, "messages": "hello"}, "messages", "invalid_type"),
        ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({**GOOD, "temperature": 5}, "temperature", "decimal_above_max_value"),
        ({**GOOD, "temperature": -1}, "temperature", "decimal_below_min_value"),
        ({**GOOD, "top_p": 1.5}, "top_p", "decimal_above_max_value"),
        ({**GOOD, "n": 0}, "n", "integer_below_min_value"),
        ({**GOOD, "n": 129}, "n", "integer_above_max_value"),
        ({**GOOD, "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({**GOOD, "max_completion_tokens": "ten"}, "max_completion_tokens", "invalid_type"),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({**GOOD, "stop": 5}, "stop", "invalid_type"),
        ({**GOOD, "seed": "x"}, "seed", "invalid_type"),
        ({**GOOD, "bogus": 1}, "bogus", "unknown_parameter"),
    ],
)
def test_invalid_body(http: httpx.Client, db: Engine, body, param, code) -> None:
    before = count_jobs(db)
    error = assert_envelope(http.post(URL, json=body), 400, param, code or "invalid_value")
    assert param in error["message"]
    assert count_jobs(db) == before


def test_missing_role_is_named(http: httpx.Client) -> None:
    body = {**GOOD, "messages": [{"content": "no role"}]}
    assert_envelope(
        http.post(URL, json=body), 400, "messages[0].role", "missing_required_parameter"
    )


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(URL, content=b'{"model": ', headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert "could not parse the JSON body" in error["message"]


def test_body_not_an_object(http: httpx.Client) -> None:
    assert_envelope(http.post(URL, json=[1, 2]), 400, code="invalid_type")


def test_no_key_and_wrong_key(stack: Stack) -> None:
    no_key = httpx.post(f"{stack.base_url}{URL}", json=GOOD)
    assert_envelope(no_key, 401)
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(
        f"{stack.base_url}{URL}", json=GOOD, headers={"Authorization": "Bearer sk-ferry-wrong"}
    )
    assert_envelope(wrong, 401, code="invalid_api_key")
    # The key is checked before the body is read.
    garbage = httpx.post(f"{stack.base_url}{URL}", content=b"{")
    assert_envelope(garbage, 401)


def test_sdk_sees_authentication_error(stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=GOOD["messages"])
    assert caught.value.code == "invalid_api_key"


def test_unknown_model(http: httpx.Client, db: Engine) -> None:
    before = count_jobs(db)
    body = {**GOOD, "model": "gpt-17"}
    assert_envelope(http.post(URL, json=body), 404, "model", "model_not_found")
    assert count_jobs(db) == before


def test_unknown_url(http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/no-such-thing"), 404, code="unknown_url")


def test_known_model_without_live_worker_answers_503_and_keeps_the_job(
    stack: Stack, http: httpx.Client, db: Engine
) -> None:
    ghost = "ghost-model"
    queue = redis.Redis.from_url(stack.redis_url)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO served_models (name) VALUES (:n)"), {"n": ghost})
    try:
        started = time.monotonic()
        response = http.post(URL, json={**GOOD, "model": ghost})
        waited = time.monotonic() - started
        error = assert_envelope(response, 503, code="no_live_worker")
        assert ghost in error["message"]
        # The suite's API waits the shipped FERRY_NO_WORKER_WAIT_SECONDS for a worker to come.
        wait = ApiSettings(_env_file=None).no_worker_wait_seconds
        assert wait <= waited < wait + 20

        with db.connect() as conn:
            job = conn.execute(
                text("SELECT id, status FROM jobs WHERE model = :m"), {"m": ghost}
            ).one()
        assert job.status == "queued"
        assert job.id in error["message"]
        # Its message waits on the model's queue for a worker to come.
        assert queue.llen(queue_for(ghost)) == 1

        ready = httpx.get(f"{stack.base_url}/readyz")
        assert ready.status_code == 503
        assert f"worker for model {ghost}" in ready.json()["missing"]
    finally:
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE model = :n"), {"n": ghost})
            conn.execute(text("DELETE FROM served_models WHERE name = :n"), {"n": ghost})
        queue.delete(queue_for(ghost))


def test_rejected_request_enqueues_nothing(stack: Stack, http: httpx.Client, db: Engine) -> None:
    ghost = "ghost-quiet"
    queue = redis.Redis.from_url(stack.redis_url)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO served_models (name) VALUES (:n)"), {"n": ghost})
    try:
        assert_envelope(
            http.post(URL, json={**GOOD, "model": ghost, "temperature": 3}),
            400,
            "temperature",
            "decimal_above_max_value",
        )
        assert queue.llen(queue_for(ghost)) == 0
    finally:
        with db.begin() as conn:
            conn.execute(text("DELETE FROM served_models WHERE name = :n"), {"n": ghost})


def test_health_and_readiness(live_worker: Stack) -> None:
    assert httpx.get(f"{live_worker.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{live_worker.base_url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "missing": []}
