"""The largest answer a deployment allows, end to end on the real engine, and the next one up
refused; an answer too large to ride with its job-done notification is read from Postgres.

A second API process on the suite's stack gets low limits (the suite's own API keeps the shipped
ones), so that the largest allowed answer is a few seconds of the CPU engine's work.
"""

import threading
import time

import openai
import pytest
import redis

from bench.stack import Stack, free_port
from core.bus import JOB_DONE_CHANNEL, NOTIFIED_RESULT_MAX_BYTES
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

CHOICES, TOKENS, ALTERNATIVES = 8, 128, 20
# The end-of-text tokens banned: every choice runs to its max tokens.
NO_END = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def limited(live_worker: Stack, api_key: str) -> openai.OpenAI:
    """The SDK on an API process whose limits the request below fills exactly."""
    port = free_port()
    live_worker.start_api_on(
        port,
        "api-limited",
        FERRY_MAX_OUTPUT_TOKENS=str(CHOICES * TOKENS),
        FERRY_MAX_LOGPROB_ENTRIES=str(CHOICES * TOKENS * (1 + ALTERNATIVES)),
    )
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)


def test_the_largest_allowed_answer_arrives_whole(limited: openai.OpenAI, stack: Stack) -> None:
    notifications: list[bytes] = []
    subscriber = redis.Redis.from_url(stack.redis_url).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(JOB_DONE_CHANNEL)
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            message = subscriber.get_message(timeout=0.5)
            if message is not None:
                notifications.append(message["data"])

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        completion = limited.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story about the sea."}],
            n=CHOICES,
            # Several choices need sampling: the default model answers greedily by default.
            temperature=1.0,
            seed=7,
            max_completion_tokens=TOKENS,
            logprobs=True,
            top_logprobs=ALTERNATIVES,
            logit_bias=NO_END,
            store=True,
        )
        time.sleep(0.5)
    finally:
        done.set()
        thread.join(5)
        subscriber.close()

    assert len(completion.choices) == CHOICES
    assert completion.usage is not None
    assert completion.usage.completion_tokens == CHOICES * TOKENS
    for choice in completion.choices:
        assert choice.finish_reason == "length"
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == TOKENS
        assert all(len(t.top_logprobs) == ALTERNATIVES for t in choice.logprobs.content)
    # Too large for its notification: the worker published the id alone.
    size = len(completion.model_dump_json())
    assert size > NOTIFIED_RESULT_MAX_BYTES
    mine = [data for data in notifications if completion.id.encode() in data]
    assert mine == [completion.id.encode()], [m[:100] for m in mine]


def test_one_token_more_is_refused(limited: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        limited.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            n=CHOICES,
            max_completion_tokens=TOKENS + 1,
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "output_too_large" and error["param"] == "n"
    assert f"{CHOICES * (TOKENS + 1):,} output tokens" in error["message"]
