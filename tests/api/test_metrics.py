"""Prometheus metrics: the API's /metrics, open only to the scrape token and scraped while a
batch runs, and a worker's port after a completion. Scrapes are parsed with prometheus_client's
own parser, as Prometheus would."""

import io
import json
import secrets
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import check_scrape_token
from bench.stack import Stack, free_port
from core.errors import AuthenticationError
from core.settings import ApiSettings
from tests.conftest import MODEL

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

TOKEN = f"scrape-{secrets.token_urlsafe(16)}"


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> str:
    """The base URL of a second API process of the stack's, started with a scrape token (the
    suite's own API has none: its /metrics answers nobody)."""
    port = free_port()
    stack.start_api_on(port, "api-metrics", FERRY_METRICS_TOKEN=TOKEN)
    return f"http://127.0.0.1:{port}"


def fetch(url: str) -> httpx.Response:
    """A scrape as Prometheus sends it, with the token (a worker's port ignores it)."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    return parse(fetch(url).text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def until(what: str, check: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {seconds:g} s"
        time.sleep(0.3)


def test_metrics_answer_only_the_scrape_token(stack: Stack, scraped: str, api_key: str) -> None:
    # Without a token set (the default), nobody: not even a valid API key.
    for headers in ({}, {"Authorization": f"Bearer {api_key}"}, {"Authorization": "Bearer x"}):
        refused = httpx.get(f"{stack.base_url}/metrics", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "FERRY_METRICS_TOKEN" in refused.json()["error"]["message"]
        assert "ferry_" not in refused.text
    # With one: only a scrape that bears it.
    for headers in ({}, {"Authorization": f"Bearer {api_key}"}, {"Authorization": TOKEN}):
        refused = httpx.get(f"{scraped}/metrics", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert "ferry_" not in refused.text
    assert "ferry_jobs" in fetch(f"{scraped}/metrics").text


def test_scrape_token_check() -> None:
    def refused(settings: ApiSettings, authorization: str | None) -> bool:
        try:
            check_scrape_token(settings, authorization)
        except AuthenticationError:
            return True
        return False

    off = ApiSettings(_env_file=None)
    assert off.metrics_token.get_secret_value() == ""
    assert refused(off, None) and refused(off, "Bearer ") and refused(off, "Bearer x")
    on = ApiSettings(_env_file=None, metrics_token="s3cret-tøken")
    assert not refused(on, "Bearer s3cret-tøken") and not refused(on, "bearer  s3cret-tøken")
    for wrong in (None, "", "Bearer", "Bearer s3cret", "Basic s3cret-tøken", "s3cret-tøken"):
        assert refused(on, wrong), wrong
    assert "s3cret" not in repr(on)


def test_http_requests_are_counted_by_route_template_and_status(scraped: str) -> None:
    base = scraped
    assert httpx.get(f"{base}/v1/batches/batch_nope").status_code == 401  # before routing
    assert httpx.get(f"{base}/no/such/path/123").status_code == 404
    assert httpx.get(f"{base}/healthz").status_code == 200
    samples = scrape(f"{base}/metrics")
    total = "ferry_http_requests_total"
    route = "/v1/batches/{batch_id}"
    assert value(samples, total, method="GET", route=route, status="401") >= 1
    assert value(samples, total, method="GET", route="<unmatched>", status="404") >= 1
    assert value(samples, total, method="GET", route="/healthz", status="200") >= 1
    assert not any("batch_nope" in dict(labels).get("route", "") for _, labels in samples)
    count = value(
        samples,
        "ferry_http_request_duration_seconds_count",
        method="GET",
        route="/healthz",
        status="200",
    )
    assert count is not None and count >= 1
    assert value(samples, "ferry_metrics_source_up", source="postgres") == 1
    assert value(samples, "ferry_metrics_source_up", source="redis") == 1


def batch_lines(count: int, max_tokens: Callable[[int], int]) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"m-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Tell a story about ship {i}."}],
                    "max_tokens": max_tokens(i),
                },
            }
        )
        for i in range(count)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.e2e
def test_api_metrics_while_a_batch_runs(live_worker: Stack, scraped: str, api_key: str) -> None:
    # Through the scraped API process: its HTTP counters are its own.
    client = openai.OpenAI(base_url=f"{scraped}/v1", api_key=api_key, max_retries=0)
    url = f"{scraped}/metrics"
    file = client.files.create(
        file=("metrics.jsonl", io.BytesIO(batch_lines(20, lambda i: 16 + 4 * i))), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    seen: list[float] = []

    def listed() -> bool:
        in_progress = client.batches.retrieve(batch.id).status == "in_progress"
        text = fetch(url).text
        # Batches are summed per model: no batch id (nor project) is in any label.
        assert batch.id not in text
        assert 'batch_id="' not in text and "project=" not in text
        samples = parse(text)
        # Others' batches not yet ended may count too.
        total = value(samples, "ferry_batch_requests", model=MODEL, state="total") or 0
        if total < 20 or not in_progress:
            return False
        completed = value(samples, "ferry_batch_requests", model=MODEL, state="completed")
        failed = value(samples, "ferry_batch_requests", model=MODEL, state="failed")
        assert completed is not None and failed is not None
        assert 0 <= completed + failed <= total
        assert (value(samples, "ferry_batches", model=MODEL, status="in_progress") or 0) >= 1
        seen.append(total)
        # While the batch runs, its jobs are queued or running for the model.
        queued = value(samples, "ferry_jobs", model=MODEL, status="queued")
        running = value(samples, "ferry_jobs", model=MODEL, status="running")
        depth = value(samples, "ferry_queue_depth", model=MODEL)
        assert queued is not None and running is not None and depth == queued
        assert value(samples, "ferry_workers", model=MODEL) == 1
        assert queued + running >= 20 - completed
        return True

    until("counted in ferry_batch_requests", listed, 60)
    until(
        "completed",
        lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"),
        240,
    )
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 20

    samples = scrape(url)
    # An ended batch leaves the gauges (no batch starts meanwhile); its jobs count as succeeded
    # (ended jobs are recounted once a minute: they are most of the table).
    left = value(samples, "ferry_batch_requests", model=MODEL, state="total") or 0
    assert left <= seen[-1] - 20, (left, seen)
    until(
        "counted as succeeded",
        lambda: (value(scrape(url), "ferry_jobs", model=MODEL, status="succeeded") or 0) >= 20,
        75,
    )
    total = "ferry_http_requests_total"
    assert value(samples, total, method="POST", route="/v1/files", status="200") >= 1
    assert value(samples, total, method="POST", route="/v1/batches", status="200") >= 1
    assert value(samples, total, method="GET", route="/v1/batches/{batch_id}", status="200") >= 2


@pytest.mark.e2e
def test_worker_metrics_count_tokens_and_jobs(client: openai.OpenAI, live_worker: Stack) -> None:
    url = f"http://127.0.0.1:{live_worker.metrics_ports['worker']}/metrics"
    before = scrape(url)
    info = [dict(labels) for name, labels in before if name == "ferry_worker_info"]
    assert info and info[0]["model"] == MODEL and info[0]["worker_id"].startswith(MODEL)
    in_engine = value(before, "ferry_worker_jobs_in_engine")
    assert in_engine is not None and in_engine >= 0
    assert value(before, "ferry_worker_engine_errors_total") is not None

    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=24,
    )
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    def counted(name: str, **labels: str) -> float:
        return (value(scrape(url), name, **labels) or 0) - (value(before, name, **labels) or 0)

    # The worker counts the job when it ends, at the latest just after the API has answered.
    until(
        "counted by the worker",
        lambda: counted("ferry_worker_jobs_total", outcome="succeeded") >= 1,
        10,
    )
    assert counted("ferry_worker_output_tokens_total") >= completion.usage.completion_tokens
    assert counted("ferry_worker_prompt_tokens_total") >= completion.usage.prompt_tokens
    assert value(scrape(url), "ferry_worker_jobs_in_engine") == 0


def test_worker_metric_helpers() -> None:
    from prometheus_client import REGISTRY

    from workers import metrics

    def read(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "in": read("ferry_worker_jobs_in_engine"),
        "ok": read("ferry_worker_jobs_total", outcome="succeeded"),
        "out": read("ferry_worker_output_tokens_total"),
        "prompt": read("ferry_worker_prompt_tokens_total"),
        "errors": read("ferry_worker_engine_errors_total"),
    }
    metrics.job_started(3)
    assert read("ferry_worker_jobs_in_engine") == before["in"] + 3
    metrics.job_finished("succeeded", {"prompt_tokens": 11, "completion_tokens": 7})
    metrics.job_finished("failed")
    metrics.engine_error()
    metrics.job_released()
    assert read("ferry_worker_jobs_in_engine") == before["in"]
    assert read("ferry_worker_jobs_total", outcome="succeeded") == before["ok"] + 1
    assert read("ferry_worker_output_tokens_total") == before["out"] + 7
    assert read("ferry_worker_prompt_tokens_total") == before["prompt"] + 11
    assert read("ferry_worker_engine_errors_total") == before["errors"] + 1
    metrics.serve(0, model=MODEL, worker_id="w")  # 0: nothing served, the info is set
    assert read("ferry_worker_info", model=MODEL, worker_id="w") == 1
