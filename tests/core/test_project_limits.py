"""A project's limits as pure functions: which row applies, a request's estimate, OpenAI's
header formats and wording, and what batches in progress hold (fast; no stack)."""

from dataclasses import dataclass

import pytest

from core import project_limits
from core.errors import RateLimitError
from core.project_limits import Bucket, Limits, QueuedBatch
from core.wire.requests import ChatCompletionRequest


def request(content: str = "Hi", **fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], **fields}
    )


@dataclass
class Row:
    model: str | None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    batch_queue_tokens: int | None = None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.25, "59.25s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (361.2, "6m2s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_is_written_as_openai_writes_it(seconds: float, text: str) -> None:
    assert project_limits.format_reset(seconds) == text


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert project_limits.retry_after(0.2) == {"Retry-After": "1", "retry-after-ms": "200"}
    assert project_limits.retry_after(29.01) == {"Retry-After": "30", "retry-after-ms": "29010"}


def test_the_estimate_counts_the_prompt_and_all_the_output_it_may_ask_for() -> None:
    # 40 characters: 10 tokens, and 4 for the message.
    text = "x" * 40
    assert project_limits.estimate_tokens(request(text, max_tokens=50), 2048) == 14 + 50
    assert project_limits.estimate_tokens(request(text, max_completion_tokens=50, n=3), 2048) == (
        14 + 150
    )
    # Without max tokens: the room the prompt leaves in the context.
    assert project_limits.estimate_tokens(request(text), 2048) == 2048
    # A budget past that room is cut to it, as the engine cuts it.
    assert project_limits.estimate_tokens(request(text, max_tokens=5000), 100) == 100
    # No context known and no budget: the prompt alone.
    assert project_limits.estimate_tokens(request(text), None) == 14


def test_a_models_row_replaces_the_project_wide_one() -> None:
    rows = [Row(None, rpm=10, tpm=1000), Row("big", rpm=2)]
    assert project_limits.for_model(rows, "small") == Limits(rpm=10, tpm=1000)
    # Its own row says all of its limits: no TPM on it.
    assert project_limits.for_model(rows, "big") == Limits(rpm=2)
    assert project_limits.for_model([Row("big", rpm=2)], "small") is None
    assert project_limits.for_model([], "small") is None


def test_only_per_request_limits_cost_a_redis_trip() -> None:
    assert not Limits(batch_queue_tokens=5).interactive
    assert Limits(max_concurrent=1).interactive


def test_headers_name_only_the_limits_a_project_has() -> None:
    requests = Bucket(limit=60, remaining=59, reset_seconds=1)
    tokens = Bucket(limit=150_000, remaining=149_984, reset_seconds=0.006)
    assert project_limits.headers(requests, tokens) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "6ms",
    }
    assert project_limits.headers(requests, None).keys() == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
    # A debt (a job that used more than its estimate) never shows below zero.
    owing = Bucket(limit=100, remaining=-40, reset_seconds=84)
    assert project_limits.headers(None, owing)["x-ratelimit-remaining-tokens"] == "0"
    assert project_limits.headers(None, None) == {}


def test_refusals_read_as_openais() -> None:
    message = project_limits.requests_refused("m", "team", 3, 20)
    assert message == (
        "Rate limit reached for m in project team on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s."
    )
    tokens = project_limits.tokens_refused("m", "team", 10_000, 8554, 3082, 9.816)
    assert "on tokens per min (TPM): Limit 10000, Used 8554, Requested 3082" in tokens
    assert tokens.endswith("Please try again in 9.816s.")
    error = RateLimitError(message, type="requests", headers={"Retry-After": "20"})
    assert error.status_code == 429
    assert error.envelope() == {
        "error": {
            "message": message,
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert error.headers == {"Retry-After": "20"}


def test_batches_hold_their_estimate_less_the_share_of_their_jobs_that_ended() -> None:
    fresh = QueuedBatch({"m": 1000, "other": 50}, total=10, invalid=0, completed=0, failed=0)
    # 8 valid lines, 4 ended: half of its 1000 is still held.
    half = QueuedBatch({"m": 1000}, total=10, invalid=2, completed=3, failed=1)
    done = QueuedBatch({"m": 1000}, total=10, invalid=2, completed=6, failed=2)
    old = QueuedBatch(None, total=10, invalid=0, completed=0, failed=0)
    assert project_limits.batch_tokens_in_use([fresh, half, done, old], "m") == 1500
    assert project_limits.batch_tokens_in_use([fresh], "other") == 50
    assert project_limits.batch_tokens_in_use([], "m") == 0
