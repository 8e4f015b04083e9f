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
from sqlalchemy import Engine, text

from api.metrics import check_scrape_token
from bench.stack import Stack, free_port
from core.errors import AuthenticationError
from core.settings import ApiSettings
from tests.api.test_project_limits import LONG, set_limits
from tests.api.test_project_limits import project as limited_project
from tests.conftest import MODEL

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

TOKEN = f"scrape-{secrets.token_urlsafe(16)}"
# Every label Ferry's own metrics on the API may have: never a key, a batch or a job.
LABELS = {
    "method",
    "route",
    "status",
    "le",
    "model",
    "state",
    "source",
    "project",
    "kind",
    "type",
    "limit",
    # Webhook deliveries' outcome: delivered, failed_attempt, refused, gave_up.
    "outcome",
}


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
        # Batches are summed per model: no batch id (nor key) is in any label.
        assert batch.id not in text
        samples = parse(text)
        ours = {
            name for metric, labels in samples if metric.startswith("ferry_") for name, _ in labels
        }
        assert ours <= LABELS, ours - LABELS
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


def project_figures(client: httpx.Client) -> list[dict]:
    """The dashboard's per-project rows, as `client`'s key sees them."""
    answer = client.get("/v1/dashboard/workers")
    assert answer.status_code == 200, answer.text
    return answer.json()["projects"]


def live_jobs(db: Engine, name: str) -> dict[tuple[str, str], int]:
    """The project's jobs queued and running, per (kind, status), from the jobs table."""
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT CASE WHEN batch_id IS NULL THEN 'interactive' ELSE 'batch' END, status,"
                " count(*) FROM jobs WHERE project = :p AND status IN ('queued', 'running')"
                " GROUP BY 1, 2"
            ),
            {"p": name},
        )
        return {(kind, status): n for kind, status, n in rows}


def used_tokens(db: Engine, name: str) -> tuple[int, int, int]:
    """The sums of the project's jobs' own usage: prompt, completion, cached."""
    with db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
                " coalesce(sum(cached_tokens), 0) FROM jobs"
                " WHERE project = :p AND status = 'succeeded'"
            ),
            {"p": name},
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.e2e
def test_each_projects_jobs_tokens_and_refusals(
    live_worker: Stack, scraped: str, db: Engine, api_key: str
) -> None:
    name, key = limited_project(live_worker, rpm="1")
    admin_key = (
        live_worker.ferry("keys", "create", "seen-admin", "--admin").strip().splitlines()[-1]
    )
    hi = [{"role": "user", "content": "Say hi."}]
    # Sent to the suite's API process, read through another one: refusals are counted in Redis,
    # so every process shows all of them.
    client = openai.OpenAI(base_url=f"{live_worker.base_url}/v1", api_key=key, max_retries=0)
    done = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4)
    assert done.usage is not None
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4)
    url = f"{scraped}/metrics"
    mine = httpx.Client(base_url=scraped, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    admin = httpx.Client(
        base_url=scraped, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
    )
    ids = f"chatcmpl-seen{time.time_ns()}"
    running: str | None = None
    try:
        samples = scrape(url)
        throttled = "ferry_project_requests_throttled_total"
        assert value(samples, throttled, project=name, model=MODEL, limit="rpm") == 3
        for limit in ("tpm", "max_concurrent", "batch_queue_tokens"):
            assert value(samples, throttled, project=name, model=MODEL, limit=limit) is None
        # The key's own row, and only it.
        (row,) = project_figures(mine)
        assert row["project"] == name
        refusals = {"rpm": 3, "tpm": 0, "max_concurrent": 0, "batch_queue_tokens": 0, "all": 3}
        assert row["throttled_last_hour"] == refusals
        assert row["throttled_total"] == refusals
        # Tokens: the sums of the project's jobs' usage, as the engine gave it.
        prompt, completion, cached = used_tokens(db, name)
        assert (prompt, completion) == (done.usage.prompt_tokens, done.usage.completion_tokens)
        assert row["tokens_last_hour"] == {
            "prompt": prompt,
            "completion": completion,
            "cached": cached,
        }
        tokens = "ferry_project_tokens_last_hour"
        assert value(samples, tokens, project=name, model=MODEL, type="prompt") == prompt
        assert value(samples, tokens, project=name, model=MODEL, type="completion") == completion
        assert value(samples, tokens, project=name, model=MODEL, type="cached") == cached

        # Jobs queued that nobody sends (left alone by the reconciler for an hour): 3
        # interactive, and 2 lines of a batch in progress (which ends in an hour); and one
        # running. As the jobs table has them, in /metrics and on the dashboard.
        queue = (
            "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
            " created, queued_at, batch_id, line_number)"
            " SELECT :ids || :kind || n, k.project, k.id, :model, 'queued', false, 0,"
            " extract(epoch from now())::bigint, now() + interval '1 hour', :batch, n"
            " FROM (SELECT project, id FROM api_keys WHERE project = :p LIMIT 1) AS k,"
            " generate_series(1, :count) AS n"
        )
        with db.begin() as conn:
            for made in (
                "INSERT INTO files (id, project, api_key_id, filename, purpose, bytes)"
                " SELECT :ids, project, id, 'in.jsonl', 'batch', 0 FROM api_keys"
                " WHERE project = :p LIMIT 1",
                "INSERT INTO batches (id, project, api_key_id, endpoint, input_file_id,"
                " completion_window, status, total, invalid, in_progress_at, expires_at)"
                " SELECT :ids, project, id, '/v1/chat/completions', :ids, '24h',"
                " 'in_progress', 2, 0, now() + interval '1 hour', now() + interval '1 hour'"
                " FROM api_keys WHERE project = :p LIMIT 1",
            ):
                conn.execute(text(made), {"ids": f"{ids}-batch", "p": name})
            for kind, batch, count in (("-i-", None, 3), ("-b-", f"{ids}-batch", 2)):
                conn.execute(
                    text(queue),
                    {
                        "ids": ids,
                        "kind": kind,
                        "model": MODEL,
                        "p": name,
                        "batch": batch,
                        "count": count,
                    },
                )
        set_limits(live_worker, name, rpm="none")
        started = mine.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": LONG, "max_tokens": 1500},
            headers={"Prefer": "respond-async"},
        )
        assert started.status_code == 202, started.text
        running = started.json()["id"]
        until("running", lambda: live_jobs(db, name).get(("interactive", "running")) == 1, 60)

        def agree() -> bool:
            # Read between two reads of the table that agree: the long job may end meanwhile.
            before = live_jobs(db, name)
            samples, (row,) = scrape(url), project_figures(mine)
            if live_jobs(db, name) != before:
                return False
            for kind in ("interactive", "batch"):
                for status in ("queued", "running"):
                    n = before.get((kind, status), 0)
                    labels = {"project": name, "model": MODEL, "kind": kind, "status": status}
                    assert value(samples, "ferry_project_jobs", **labels) == n, (labels, before)
                    assert row[status][kind] == n, (row, before)
            return True

        until("read while the jobs stood still", agree, 30)
        assert live_jobs(db, name) == {
            ("interactive", "queued"): 3,
            ("interactive", "running"): 1,
            ("batch", "queued"): 2,
        }

        # An admin key sees every project's row: this one and the suite's own.
        with db.connect() as conn:
            suite = conn.execute(
                text("SELECT project FROM api_keys WHERE name = 'suite' LIMIT 1")
            ).scalar_one()
        everyone = {r["project"]: r for r in project_figures(admin)}
        assert {name, suite} <= set(everyone)
        assert everyone[name]["throttled_total"]["rpm"] == 3
        assert everyone[name]["queued"] == {"interactive": 3, "batch": 2}
        # The suite's key sees its own row only.
        with httpx.Client(
            base_url=scraped, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        ) as own:
            assert [r["project"] for r in project_figures(own)] == [suite]
    finally:
        if running is not None:
            mine.post(f"/v1/chat/completions/{running}/cancel")
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id LIKE :ids"), {"ids": f"{ids}-%"})
            conn.execute(text("DELETE FROM batches WHERE id = :id"), {"id": f"{ids}-batch"})
            conn.execute(text("DELETE FROM files WHERE id = :id"), {"id": f"{ids}-batch"})
        mine.close()
        admin.close()


def test_project_rows_sum_each_projects_models() -> None:
    from api.dashboard import projects_view
    from api.throttled import Throttled

    jobs = {
        ("a", "m1", "interactive", "queued"): 2,
        ("a", "m2", "interactive", "queued"): 3,
        ("a", "m1", "batch", "running"): 4,
        ("b", "m1", "batch", "queued"): 1,
    }
    tokens = {("a", "m1"): (10, 20, 5), ("a", "m2"): (1, 2, 0), ("c", "m1"): (7, 0, 0)}
    refused = Throttled(
        total={("a", "m1", "rpm"): 4, ("a", "m2", "rpm"): 1, ("d", "m1", "batch_queue_tokens"): 2},
        last_hour={("a", "m1", "rpm"): 2, ("a", "m1", "tpm"): 0},
    )
    rows = {row.project: row.model_dump() for row in projects_view(["e"], jobs, tokens, refused)}
    # Created projects, and any other with figures.
    assert list(rows) == ["a", "b", "c", "d", "e"]
    a = rows["a"]
    assert a["queued"] == {"interactive": 5, "batch": 0}
    assert a["running"] == {"interactive": 0, "batch": 4}
    assert a["tokens_last_hour"] == {"prompt": 11, "completion": 22, "cached": 5}
    none = {"rpm": 0, "tpm": 0, "max_concurrent": 0, "batch_queue_tokens": 0, "all": 0}
    assert a["throttled_total"] == none | {"rpm": 5, "all": 5}
    assert a["throttled_last_hour"] == none | {"rpm": 2, "all": 2}
    assert rows["d"]["throttled_total"] == none | {"batch_queue_tokens": 2, "all": 2}
    assert rows["e"]["queued"] == rows["e"]["running"] == {"interactive": 0, "batch": 0}
    assert rows["e"]["throttled_total"] == none
    # One project's share of the refusals.
    assert set(refused.of("a").total) == {("a", "m1", "rpm"), ("a", "m2", "rpm")}
