"""The Usage API's own arithmetic and words (no servers needed): buckets on UTC's grid, the page
cursor, the query as OpenAI and its SDKs write it, the sums' statement per key, and pages
shaped as OpenAI's document has them. Sums over real jobs: tests/e2e/test_usage.py."""

from dataclasses import asdict
from itertools import pairwise
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.dialects import postgresql

from api.errors import install_error_handlers
from api.usage import (
    MAX_TIME,
    BucketPage,
    UsageQuery,
    bucket_page,
    decode_page,
    encode_page,
    page_of,
    range_end,
    sums,
    usage_query,
)
from core.errors import InvalidRequestError
from core.tables import ApiKey
from tests.api.test_api_errors import assert_envelope
from tests.openai_schema import validate

DAY, HOUR, MINUTE = 86_400, 3_600, 60
# 2024-11-01T00:00:00Z, OpenAI's own example's first bucket.
MIDNIGHT = 1_730_419_200


def test_buckets_lie_on_the_grid_but_the_first_starts_at_start_and_the_last_ends_at_end() -> None:
    cut = bucket_page(MIDNIGHT + 5 * HOUR, MIDNIGHT + 2 * DAY + HOUR, DAY, 7)
    assert cut.buckets == [
        (MIDNIGHT + 5 * HOUR, MIDNIGHT + DAY),
        (MIDNIGHT + DAY, MIDNIGHT + 2 * DAY),
        (MIDNIGHT + 2 * DAY, MIDNIGHT + 2 * DAY + HOUR),
    ]
    assert cut.next_start is None
    aligned = bucket_page(MIDNIGHT, MIDNIGHT + 3 * HOUR, HOUR, 24)
    assert aligned.buckets == [(MIDNIGHT + h * HOUR, MIDNIGHT + (h + 1) * HOUR) for h in range(3)]


def test_buckets_past_the_limit_go_to_the_next_page_which_starts_on_the_grid() -> None:
    cut = bucket_page(MIDNIGHT + 30, MIDNIGHT + 10 * MINUTE, MINUTE, 3)
    assert cut.buckets == [
        (MIDNIGHT + 30, MIDNIGHT + MINUTE),
        (MIDNIGHT + MINUTE, MIDNIGHT + 2 * MINUTE),
        (MIDNIGHT + 2 * MINUTE, MIDNIGHT + 3 * MINUTE),
    ]
    assert cut.next_start == MIDNIGHT + 3 * MINUTE
    rest = bucket_page(MIDNIGHT + 3 * MINUTE, MIDNIGHT + 10 * MINUTE, MINUTE, 7)
    assert len(rest.buckets) == 7 and rest.next_start is None
    # Exactly a page's worth: no page after it.
    assert bucket_page(MIDNIGHT, MIDNIGHT + 3 * MINUTE, MINUTE, 3).next_start is None


def test_pages_cover_the_range_exactly_once() -> None:
    start, end, covered = MIDNIGHT + 17, MIDNIGHT + 5 * DAY + 3, []
    at: int | None = start
    while at is not None:
        cut = bucket_page(at, end, HOUR, 24)
        covered += cut.buckets
        at = cut.next_start
    assert covered[0][0] == start and covered[-1][1] == end
    assert all(a[1] == b[0] for a, b in pairwise(covered))


def test_no_buckets_when_the_range_is_empty() -> None:
    assert bucket_page(MIDNIGHT, MIDNIGHT, DAY, 7) == BucketPage([], None)
    assert bucket_page(MIDNIGHT + 1, MIDNIGHT, DAY, 7) == BucketPage([], None)


def test_the_range_ends_with_the_bucket_that_holds_now() -> None:
    now = MIDNIGHT + 5 * HOUR + 7
    assert range_end(None, DAY, now) == MIDNIGHT + DAY
    assert range_end(None, MINUTE, now) == MIDNIGHT + 5 * HOUR + MINUTE
    assert range_end(MIDNIGHT + HOUR, DAY, now) == MIDNIGHT + HOUR
    assert range_end(MAX_TIME, HOUR, now) == MIDNIGHT + 6 * HOUR


def test_a_cursor_names_where_its_page_starts() -> None:
    cursor = encode_page(MIDNIGHT + DAY)
    assert cursor.startswith("page_")
    assert decode_page(cursor, MIDNIGHT) == MIDNIGHT + DAY


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "page_",
        "nope",
        "page_!!!!",
        "page_AAAA",
        encode_page(MIDNIGHT + DAY).removeprefix("page_"),
        encode_page(MIDNIGHT),  # not after start_time
        encode_page(MIDNIGHT - DAY),
        encode_page(MAX_TIME + 1),
        "page_\udc80",
        "page_é",
    ],
)
def test_a_cursor_from_no_answer_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        decode_page(cursor, MIDNIGHT)
    assert caught.value.param == "page" and caught.value.code == "invalid_value"


@pytest.fixture(scope="module")
def parsed() -> TestClient:
    """An app whose one route answers with the usage query it read."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/usage")
    def read(query: Annotated[UsageQuery, Depends(usage_query)]) -> dict[str, Any]:
        return asdict(query)

    return TestClient(app)


def test_the_query_defaults_as_openais(parsed: TestClient) -> None:
    got = parsed.get("/usage", params={"start_time": MIDNIGHT}).json()
    assert got == {
        "start_time": MIDNIGHT,
        "end_time": None,
        "width": DAY,
        "limit": 7,
        "project_ids": None,
        "user_ids": None,
        "api_key_ids": None,
        "models": None,
        "batch": None,
        "group_by": [],
        "page": None,
    }
    assert parsed.get("/usage?start_time=0&bucket_width=1h").json()["limit"] == 24
    assert parsed.get("/usage?start_time=0&bucket_width=1m").json()["limit"] == 60


def test_arrays_come_repeated_or_with_brackets_as_the_sdk_sends_them(parsed: TestClient) -> None:
    got = parsed.get(
        "/usage?start_time=0&models=a&models[]=b&models=a&project_ids[]=p&api_key_ids=k"
        "&user_ids[]=u&group_by[]=model&group_by=batch&group_by[]=model&batch=false"
    ).json()
    assert got["models"] == ["a", "b"]
    assert got["project_ids"] == ["p"]
    assert got["api_key_ids"] == ["k"]
    assert got["user_ids"] == ["u"]
    assert got["group_by"] == ["model", "batch"]
    assert got["batch"] is False


def test_a_page_cursor_is_read(parsed: TestClient) -> None:
    got = parsed.get("/usage", params={"start_time": MIDNIGHT, "page": encode_page(MIDNIGHT + 60)})
    assert got.json()["page"] == MIDNIGHT + 60


@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        ("", "start_time", "missing_required_parameter"),
        ("start_time=soon", "start_time", "invalid_type"),
        ("start_time=-1", "start_time", "integer_below_min_value"),
        (f"start_time={MAX_TIME + 1}", "start_time", "integer_above_max_value"),
        ("start_time=1" + "0" * 40, "start_time", "integer_above_max_value"),
        ("start_time=100&end_time=100", "end_time", "invalid_value"),
        ("start_time=100&end_time=50", "end_time", "invalid_value"),
        (f"start_time=0&end_time={MAX_TIME + 1}", "end_time", "integer_above_max_value"),
        ("start_time=0&bucket_width=1w", "bucket_width", "invalid_value"),
        ("start_time=0&bucket_width=", "bucket_width", "invalid_value"),
        ("start_time=0&group_by=user", "group_by", "invalid_value"),
        ("start_time=0&group_by[]=api_source", "group_by", "invalid_value"),
        ("start_time=0&limit=0", "limit", "integer_below_min_value"),
        ("start_time=0&limit=32", "limit", "integer_above_max_value"),
        ("start_time=0&bucket_width=1h&limit=169", "limit", "integer_above_max_value"),
        ("start_time=0&bucket_width=1m&limit=1441", "limit", "integer_above_max_value"),
        ("start_time=0&limit=many", "limit", "invalid_type"),
        ("start_time=0&batch=maybe", "batch", "invalid_type"),
        ("start_time=0&batch=1", "batch", "invalid_type"),
        ("start_time=0&batch=True", "batch", "invalid_type"),
        ("start_time=0&page=page_x", "page", "invalid_value"),
        ("start_time=0&models=a%00b", "models[0]", "invalid_value"),
        (
            "start_time=0&" + "&".join(["api_key_ids=k"] * 1001),
            "api_key_ids",
            "array_above_max_length",
        ),
        ("start_time=0&project_ids[]=%ED%A0%80", None, None),
    ],
)
def test_a_bad_query_is_a_400_in_openais_envelope(
    parsed: TestClient, query: str, param: str | None, code: str | None
) -> None:
    response = parsed.get(f"/usage?{query}")
    if param is None:
        # Not UTF-8 at all: read as a replacement character, which can be stored.
        assert response.status_code == 200, response.text
        return
    assert_envelope(response, 400, param, code)


def test_the_widest_limits_are_accepted(parsed: TestClient) -> None:
    for width, limit in (("1d", 31), ("1h", 168), ("1m", 1440)):
        got = parsed.get(f"/usage?start_time=0&bucket_width={width}&limit={limit}")
        assert got.json()["limit"] == limit


def _sql(key: ApiKey, query: UsageQuery) -> str:
    cut = bucket_page(query.start_time, query.start_time + DAY, query.width, query.limit)
    compiled = sums(key, query, cut).compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
    )
    return str(compiled)


ORDINARY = ApiKey(id="key_a", project="proj-a", admin=False)
ADMIN = ApiKey(id="key_root", project="default", admin=True)


def test_an_ordinary_key_sums_its_projects_jobs_and_an_admin_key_every_projects() -> None:
    query = UsageQuery(start_time=MIDNIGHT, end_time=None, width=HOUR, limit=24)
    assert "jobs.project = 'proj-a'" in _sql(ORDINARY, query)
    assert "jobs.project" not in _sql(ADMIN, query)
    # Another project named: both conditions hold, so nothing of it is counted.
    other = UsageQuery(
        start_time=MIDNIGHT, end_time=None, width=HOUR, limit=24, project_ids=("proj-b",)
    )
    sql = _sql(ORDINARY, other)
    assert "jobs.project = 'proj-a'" in sql and "jobs.project IN ('proj-b')" in sql


def test_only_succeeded_jobs_count_in_the_range_by_when_they_ended() -> None:
    query = UsageQuery(
        start_time=MIDNIGHT,
        end_time=None,
        width=HOUR,
        limit=24,
        models=("m",),
        api_key_ids=("k",),
        batch=True,
        group_by=("model", "batch", "api_key_id", "project_id", "user_id", "service_tier"),
    )
    sql = _sql(ADMIN, query)
    assert "jobs.status = 'succeeded'" in sql
    assert f"jobs.finished_at >= to_timestamp({MIDNIGHT})" in sql
    assert f"jobs.finished_at < to_timestamp({MIDNIGHT + DAY})" in sql
    assert "jobs.model IN ('m')" in sql and "jobs.api_key_id IN ('k')" in sql
    assert "jobs.batch_id IS NOT NULL" in sql
    group_by = sql.split("GROUP BY", 1)[1]
    assert "jobs.model" in group_by and "jobs.api_key_id" in group_by
    assert "jobs.project" in group_by and "jobs.batch_id IS NOT NULL" in group_by
    non_batch = UsageQuery(start_time=MIDNIGHT, end_time=None, width=HOUR, limit=24, batch=False)
    assert "jobs.batch_id IS NULL" in _sql(ADMIN, non_batch)


def test_a_user_filter_matches_nothing() -> None:
    query = UsageQuery(start_time=MIDNIGHT, end_time=None, width=HOUR, limit=24, user_ids=("u",))
    assert "false" in _sql(ADMIN, query).lower()


def test_a_page_holds_every_bucket_with_its_groups_and_nulls_for_the_rest() -> None:
    query = UsageQuery(
        start_time=MIDNIGHT,
        end_time=None,
        width=HOUR,
        limit=3,
        group_by=("model", "user_id", "batch", "service_tier"),
    )
    cut = bucket_page(MIDNIGHT, MIDNIGHT + 5 * HOUR, HOUR, 3)
    rows = [
        (MIDNIGHT + 2 * HOUR, 30, 16, 7, 2, "b", True),
        (MIDNIGHT, 10, 0, 4, 1, "b", False),
        (MIDNIGHT, 20, 8, 5, 3, "a", False),
    ]
    page = page_of(query, cut, rows)
    body = page.model_dump(mode="json")
    validate("UsageResponse", body)
    assert body["has_more"] is True and body["next_page"] == encode_page(MIDNIGHT + 3 * HOUR)
    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == cut.buckets
    first, empty, third = body["data"]
    assert empty["results"] == []
    assert [r["model"] for r in first["results"]] == ["a", "b"]
    a = first["results"][0]
    assert a == {
        "object": "organization.usage.completions.result",
        "input_tokens": 20,
        "input_cached_tokens": 8,
        "input_cache_write_tokens": 0,
        "input_uncached_tokens": 12,
        "output_tokens": 5,
        "input_text_tokens": 12,
        "output_text_tokens": 5,
        "input_cached_text_tokens": 8,
        "input_audio_tokens": 0,
        "input_cached_audio_tokens": 0,
        "output_audio_tokens": 0,
        "input_image_tokens": 0,
        "input_cached_image_tokens": 0,
        "output_image_tokens": 0,
        "num_model_requests": 3,
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "model": "a",
        "batch": False,
        "service_tier": "default",
    }
    assert third["results"][0]["batch"] is True and third["results"][0]["input_tokens"] == 30


def test_ungrouped_usage_is_one_result_per_bucket_with_every_group_null() -> None:
    query = UsageQuery(start_time=MIDNIGHT, end_time=None, width=DAY, limit=7)
    cut = bucket_page(MIDNIGHT, MIDNIGHT + DAY, DAY, 7)
    body = page_of(query, cut, [(MIDNIGHT, 9, 0, 3, 2)]).model_dump(mode="json")
    validate("UsageResponse", body)
    (result,) = body["data"][0]["results"]
    assert result["input_tokens"] == 9 and result["num_model_requests"] == 2
    assert all(result[g] is None for g in ("project_id", "api_key_id", "model", "batch"))
    assert body["has_more"] is False and body["next_page"] is None
