"""End to end on real parts: the SDK -> FastAPI -> Postgres -> Celery on Redis -> vLLM -> back."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from sqlalchemy import Engine, text

from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def job_row(db: Engine, job_id: str) -> dict:
    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings()
        return dict(row.one())


def test_capital_of_france(client: openai.OpenAI, db: Engine) -> None:
    # No temperature: the default model's own sampling defaults (greedy) apply.
    completion = client.chat.completions.create(model=MODEL, messages=FRANCE, store=True)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    row = job_row(db, completion.id)
    assert row["status"] == "succeeded"
    assert row["model"] == MODEL
    assert row["request"]["messages"] == FRANCE
    assert row["response"]["choices"][0]["message"]["content"] == choice.message.content
    assert row["total_tokens"] == usage.total_tokens
    assert row["created_at"] <= row["started_at"] <= row["finished_at"]
    assert row["attempts"] == 1


def test_max_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_tokens=5,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_n_seed_and_stop_reach_the_engine(client: openai.OpenAI) -> None:
    story = [{"role": "user", "content": "Tell me a short story about a cat."}]
    first = client.chat.completions.create(
        model=MODEL, messages=story, n=3, seed=7, temperature=1.0, max_tokens=24
    )
    again = client.chat.completions.create(
        model=MODEL, messages=story, n=3, seed=7, temperature=1.0, max_tokens=24
    )
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]

    stopped = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_the_engine(client: openai.OpenAI, db: Engine) -> None:
    """Requests in flight together run inside the engine together, not one after another."""
    prompts = [f"Count from {i} to {i + 20}, one number per line." for i in range(16)]

    def ask(prompt: str):
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=48,
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        completions = list(pool.map(ask, prompts))
    assert len({c.id for c in completions}) == len(prompts)

    with db.connect() as conn:
        spans = conn.execute(
            text("SELECT started_at, finished_at FROM jobs WHERE id = ANY(:ids)"),
            {"ids": [c.id for c in completions]},
        ).all()
    # The most jobs running at one instant: with one-at-a-time execution it would be 1.
    events = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak >= len(prompts) // 2


def test_prompt_over_context_fails_that_job_with_a_clear_error(
    client: openai.OpenAI, db: Engine
) -> None:
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["code"] == "context_length_exceeded"
    assert "context length" in error["message"]

    with db.connect() as conn:
        row = conn.execute(
            text("SELECT status, error, error_status FROM jobs ORDER BY created_at DESC LIMIT 1")
        ).one()
    assert row.status == "failed"
    assert row.error_status == 400
    assert row.error["error"]["code"] == "context_length_exceeded"

    # The worker lives on: the next request succeeds.
    after = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8)
    assert after.choices[0].message.content


def test_models_lists_what_live_workers_serve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
