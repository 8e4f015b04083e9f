"""OpenAI's Usage API on the real stack: completions run (synchronous ones, some with `n` > 1, a
streamed one, a prefix-cache hit, one that fails, a small batch), then the usage summed over every
bucket, for each `bucket_width` and `group_by`, equals exactly the usage the completions and the
batch's output carry. Read through the official SDK (`client.admin.organization.usage`, which
writes arrays as `group_by[]=...`) and raw HTTP (`group_by=...`, OpenAI's document's form).

Every test's usage lives in a project of its own, so the suite's other jobs never count in it."""

import io
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from core.db import sync_engine
from core.keys import hash_key
from tests.api.test_api_errors import assert_envelope
from tests.conftest import MODEL
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e

URL = "/v1/organization/usage/completions"
WIDTHS = ("1m", "1h", "1d")
GROUPINGS: list[tuple[str, ...]] = [
    (),
    ("project_id",),
    ("model",),
    ("batch",),
    ("api_key_id",),
    ("api_key_id", "batch", "model", "project_id"),
]
# A system prompt long enough for the engine's prefix cache to hold whole blocks of it.
TEACHER = {"role": "system", "content": "You are a patient geography teacher. " * 40}


@dataclass
class Used:
    """One request's usage as its answer gave it, and what usage groups it by."""

    api_key_id: str
    batch: bool
    prompt: int
    cached: int
    completion: int


@dataclass
class Workload:
    project: str
    start_time: int
    keys: dict[str, str]  # name -> the key itself
    key_ids: dict[str, str]  # name -> its id
    used: list[Used] = field(default_factory=list)
    unstored: list[str] = field(default_factory=list)


def sums(used: list[Used]) -> dict[str, int]:
    return {
        "input_tokens": sum(u.prompt for u in used),
        "input_cached_tokens": sum(u.cached for u in used),
        "output_tokens": sum(u.completion for u in used),
        "num_model_requests": len(used),
    }


def key_id(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}
        ).scalar_one()


def admin_key(stack: Stack, name: str) -> str:
    return stack.ferry("keys", "create", name, "--admin").strip().splitlines()[-1]


def sdk(stack: Stack, key: str) -> openai.OpenAI:
    """The SDK with `key` as both its keys: the Usage API is called with the admin one."""
    return openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=key, admin_api_key=key, max_retries=0
    )


def of(usage: Any) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of an answer's `usage` (an SDK object or a dict)."""
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        return usage["prompt_tokens"], details.get("cached_tokens") or 0, usage["completion_tokens"]
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return usage.prompt_tokens, cached, usage.completion_tokens


@pytest.fixture(scope="module")
def workload(live_worker: Stack, db: Engine) -> Workload:
    """A project's completions, each kind once or more, and the usage each answer gave."""
    project = f"usage-{uuid.uuid4().hex[:10]}"
    keys = {name: live_worker.create_key(f"usage-{name}", project=project) for name in ("a", "b")}
    load = Workload(
        project=project,
        start_time=int(time.time()) - 1,
        keys=keys,
        key_ids={name: key_id(db, key) for name, key in keys.items()},
    )
    a, b = (sdk(live_worker, keys[name]) for name in ("a", "b"))

    def record(name: str, usage: Any, batch: bool = False) -> None:
        prompt, cached, completion = of(usage)
        load.used.append(Used(load.key_ids[name], batch, prompt, cached, completion))

    hi = [{"role": "user", "content": "Say hi."}]
    for i in range(3):
        # `store: false` (the default): the content is purged once delivered, the usage stays.
        done = a.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=6
        )
        record("a", done.usage)
        load.unstored.append(done.id)
    for n in (2, 3):
        done = b.chat.completions.create(
            model=MODEL, messages=hi, max_tokens=4, n=n, temperature=1.0, seed=n, store=True
        )
        assert len(done.choices) == n
        record("b", done.usage)
    for _ in range(2):
        done = b.chat.completions.create(
            model=MODEL, messages=[TEACHER, *hi], max_tokens=2, store=True
        )
        record("b", done.usage)
    chunks = list(
        a.chat.completions.create(
            model=MODEL,
            messages=hi,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    record("a", chunks[-1].usage)
    # A request that fails on the worker (its budget is above the context) counts nothing.
    with pytest.raises(openai.BadRequestError):
        a.chat.completions.create(model=MODEL, messages=hi, max_tokens=5000)

    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Name {i + 1} colours."}],
                "max_tokens": 5,
                "n": 1 + i % 2,
                "temperature": 1.0,
            },
        }
        for i in range(4)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = a.files.create(file=("usage.jsonl", io.BytesIO(data)), purpose="batch")
    batch = a.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 240
    while (batch := a.batches.retrieve(batch.id)).status != "completed":
        assert batch.status not in ("failed", "expired", "cancelled"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    assert batch.output_file_id is not None
    for raw in a.files.content(batch.output_file_id).text.splitlines():
        answer = json.loads(raw)["response"]
        assert answer["status_code"] == 200, answer
        record("a", answer["body"]["usage"], batch=True)
    assert len(load.used) == 3 + 2 + 2 + 1 + 4
    return load


def pages(client: openai.OpenAI, **params: Any) -> Iterator[Any]:
    """Every page of a usage query, through the SDK, following `next_page`."""
    page: str | None = None
    while True:
        got = client.admin.organization.usage.completions(
            **params, **({"page": page} if page else {})
        )
        yield got
        if not got.has_more:
            assert got.next_page is None
            return
        assert got.next_page
        page = got.next_page


def buckets(client: openai.OpenAI, **params: Any) -> list[Any]:
    """Every bucket of a usage query, checked to follow one another without a gap."""
    found = [bucket for page in pages(client, **params) for bucket in page.data]
    assert found, params
    assert found[0].start_time == params["start_time"]
    for before, after in pairwise(found):
        assert before.end_time == after.start_time
    for bucket in found:
        assert bucket.object == "bucket" and bucket.start_time < bucket.end_time
    return found


def totals(found: list[Any], by: tuple[str, ...] = ()) -> dict[tuple[Any, ...], dict[str, int]]:
    """Usage summed over buckets, per group (the values of `by`)."""
    out: dict[tuple[Any, ...], Counter[str]] = {}
    for bucket in found:
        for r in bucket.results:
            assert r.object == "organization.usage.completions.result"
            assert r.input_uncached_tokens == r.input_tokens - r.input_cached_tokens
            assert r.input_text_tokens == r.input_uncached_tokens
            assert r.input_cached_text_tokens == r.input_cached_tokens
            assert r.output_text_tokens == r.output_tokens
            assert r.input_audio_tokens == r.output_audio_tokens == 0
            group = tuple(getattr(r, g) for g in by)
            for name in ("input_tokens", "input_cached_tokens", "output_tokens"):
                out.setdefault(group, Counter())[name] += getattr(r, name)
            out[group]["num_model_requests"] += r.num_model_requests
    return {group: dict(counts) for group, counts in out.items()}


def expected(load: Workload, by: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, int]]:
    groups: dict[tuple[Any, ...], list[Used]] = {}
    values = {
        "project_id": lambda u: load.project,
        "model": lambda u: MODEL,
        "batch": lambda u: u.batch,
        "api_key_id": lambda u: u.api_key_id,
    }
    for u in load.used:
        groups.setdefault(tuple(values[g](u) for g in by), []).append(u)
    return {group: sums(used) for group, used in groups.items()}


@pytest.mark.parametrize("width", WIDTHS)
def test_usage_summed_over_buckets_is_the_completions_own_usage(
    workload: Workload, live_worker: Stack, width: str
) -> None:
    client = sdk(live_worker, workload.keys["a"])
    # Small pages for minutes, so that the cursor is followed too.
    limit = {"1m": 2, "1h": 24, "1d": 7}[width]
    for by in GROUPINGS:
        found = buckets(
            client,
            start_time=workload.start_time,
            bucket_width=width,
            group_by=list(by),
            limit=limit,
        )
        assert totals(found, by) == expected(workload, by), (width, by)
    assert sums(workload.used)["input_cached_tokens"] > 0, "no prefix-cache hit to count"


def test_usage_outlives_the_content_of_unstored_completions(
    workload: Workload, live_worker: Stack, db: Engine
) -> None:
    deadline = time.monotonic() + 20
    while True:
        with db.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND response IS NOT NULL"),
                {"ids": workload.unstored},
            ).scalar_one()
        if left == 0:
            break
        assert time.monotonic() < deadline, "unstored completions still hold their content"
        time.sleep(0.2)
    found = buckets(sdk(live_worker, workload.keys["b"]), start_time=workload.start_time)
    assert totals(found) == expected(workload, ())


def test_filters_keep_what_they_name(workload: Workload, live_worker: Stack) -> None:
    client = sdk(live_worker, workload.keys["a"])
    start = workload.start_time

    def total(**filters: Any) -> dict[tuple[Any, ...], dict[str, int]]:
        return totals(buckets(client, start_time=start, **filters))

    everything = expected(workload, ())
    assert total(models=[MODEL]) == everything
    assert total(project_ids=[workload.project]) == everything
    assert total(models=["no-such-model"]) == {}
    assert total(batch=True) == {(): sums([u for u in workload.used if u.batch])}
    assert total(batch=False) == {(): sums([u for u in workload.used if not u.batch])}
    b = workload.key_ids["b"]
    assert total(api_key_ids=[b]) == {(): sums([u for u in workload.used if u.api_key_id == b])}
    assert total(user_ids=["user-1"]) == {}
    # Ferry's keys belong to no user; every completion is served at the default tier.
    by_user = totals(
        buckets(client, start_time=start, group_by=["user_id", "service_tier"]),
        ("user_id", "service_tier"),
    )
    assert by_user == {(None, "default"): everything[()]}


def test_an_ordinary_key_sees_its_project_and_an_admin_key_every_project(
    workload: Workload, live_worker: Stack
) -> None:
    start = workload.start_time
    ours = expected(workload, ("project_id",))
    outsider = sdk(live_worker, live_worker.create_key("usage-outsider", project="usage-elsewhere"))
    # Another project's key: none of this project's usage, asked for by name or not.
    assert totals(buckets(outsider, start_time=start, project_ids=[workload.project])) == {}
    elsewhere = totals(
        buckets(outsider, start_time=start, group_by=["project_id"]), ("project_id",)
    )
    assert set(elsewhere) <= {("usage-elsewhere",)}
    # This project's key, naming another project: nothing.
    member = sdk(live_worker, workload.keys["b"])
    assert totals(buckets(member, start_time=start, project_ids=["usage-elsewhere"])) == {}
    # An admin key: every project's, this one's among them, exactly.
    admin = sdk(live_worker, admin_key(live_worker, "usage-admin"))
    fleet = totals(buckets(admin, start_time=start, group_by=["project_id"]), ("project_id",))
    assert fleet[(workload.project,)] == ours[(workload.project,)]
    named = buckets(
        admin, start_time=start, project_ids=[workload.project], group_by=["project_id"]
    )
    assert totals(named, ("project_id",)) == ours


def test_raw_http_in_openais_form_matches_the_document(
    workload: Workload, live_worker: Stack
) -> None:
    key = workload.keys["a"]
    with httpx.Client(
        base_url=live_worker.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        params: list[tuple[str, Any]] = [
            ("start_time", workload.start_time),
            ("bucket_width", "1h"),
            ("group_by", "model"),
            ("group_by", "batch"),
            ("models", MODEL),
            ("models", "another"),
        ]
        got = http.get(URL, params=params)
        assert got.status_code == 200, got.text
        body = got.json()
        validate("UsageResponse", body)
        assert body["object"] == "page"
        results = [r for bucket in body["data"] for r in bucket["results"]]
        assert {(r["model"], r["batch"]) for r in results} <= {(MODEL, True), (MODEL, False)}
        assert sum(r["input_tokens"] for r in results) == sums(workload.used)["input_tokens"]
        # A range that starts after the jobs: its buckets hold nothing; one past the present
        # moment has none at all.
        later = http.get(URL, params={"start_time": int(time.time()) + 1, "bucket_width": "1m"})
        assert later.status_code == 200 and all(not b["results"] for b in later.json()["data"])
        future = http.get(URL, params={"start_time": int(time.time()) + 3 * 86_400})
        assert future.json() == {"object": "page", "data": [], "has_more": False, "next_page": None}
        for query, param in [
            ({"bucket_width": "1w", "start_time": 0}, "bucket_width"),
            ({"start_time": 0, "limit": 32}, "limit"),
            ({"start_time": 0, "group_by": "colour"}, "group_by"),
            ({"start_time": 0, "page": "page_nope"}, "page"),
            ({"start_time": 10, "end_time": 5}, "end_time"),
        ]:
            error = assert_envelope(http.get(URL, params=query), 400, param, error_code(param))
            assert error["message"]
        unauthenticated = httpx.get(f"{live_worker.base_url}{URL}", params={"start_time": 0})
        assert_envelope(unauthenticated, 401)


def error_code(param: str) -> str:
    return "integer_above_max_value" if param == "limit" else "invalid_value"


def test_the_migration_keeps_the_usage_of_jobs_that_exist() -> None:
    """Jobs that ended before revision 0012 get their cached tokens (and any usage column left
    empty) from their stored response; a purged one keeps what its columns hold."""
    mine = Stack(database=os.environ.get("FERRY_TEST_DATABASE", "ferry_test") + "_usage_mig")
    mine.drop_database()
    try:
        mine.ferry("db", "upgrade", "0010")
        engine = sync_engine(mine.database_url, pool_size=1)
        usage = {
            "prompt_tokens": 30,
            "completion_tokens": 5,
            "total_tokens": 35,
            "prompt_tokens_details": {"cached_tokens": 16},
        }
        jobs = [
            # (id, status, response, prompt_tokens in its column)
            ("stored", "succeeded", {"id": "x", "usage": usage}, 30),
            ("uncounted", "succeeded", {"id": "y", "usage": usage}, None),
            ("purged", "succeeded", None, 12),
            ("no-details", "succeeded", {"usage": {**usage, "prompt_tokens_details": None}}, 30),
            ("failed", "failed", None, None),
        ]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, project, key_hash, key_prefix)"
                    " VALUES ('k', 'k', 'p', 'h', 'sk-')"
                )
            )
            for job_id, status, response, prompt in jobs:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
                        " created, response, prompt_tokens, finished_at)"
                        " VALUES (:id, 'p', 'k', 'm', :status, false, 1, 0,"
                        " CAST(:response AS jsonb), :prompt, now())"
                    ),
                    {
                        "id": job_id,
                        "status": status,
                        "response": None if response is None else json.dumps(response),
                        "prompt": prompt,
                    },
                )
        mine.ferry("db", "upgrade")
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, prompt_tokens, cached_tokens FROM jobs ORDER BY id")
            ).all()
        engine.dispose()
        assert {row[0]: (row[1], row[2]) for row in rows} == {
            "stored": (30, 16),
            "uncounted": (30, 16),
            "purged": (12, None),
            "no-details": (30, None),
            "failed": (None, None),
        }
    finally:
        mine.drop_database()
