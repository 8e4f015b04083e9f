"""OpenAI's Usage API for completions (`GET /v1/organization/usage/completions`): its query, read
by one dependency; its time buckets and page cursor; and the sums, read from the jobs' rows.

What counts is what OpenAI bills: requests that succeeded (a failed or cancelled job has no
usage), each in the bucket of the moment it ended, its result stored (`finished_at`). The numbers
are the columns the worker writes with the result (prompt, completion and cached prompt tokens,
from the engine's own `usage`), which stay when a `store: false` job's content is purged or a
stored completion is deleted: usage outlives the content. A request with `n` choices is one
request, its usage that of all its choices. A project's sums are read from one index alone
(ix_jobs_usage_project_finished_at, which carries every column they read); the fleet's, an admin
key's, from the same index or ix_jobs_finished_at, whichever the planner finds cheaper.

Buckets lie on UTC's grid for their width (whole minutes, hours, days), but the first starts at
`start_time` and the last ends at `end_time`: the buckets together hold exactly the usage of
[`start_time`, `end_time`). Without `end_time`, or with one in the future, the range ends with the
bucket that holds the database's present moment. A page holds `limit` buckets, empty ones included
(`results: []`); `next_page` is the next bucket's start, and the other parameters are sent again
with it, as OpenAI's are.

Scope: an ordinary key is a project key, as OpenAI's: it sees its project's usage only, and a
`project_ids` filter naming another project matches nothing, as a project that does not exist
does (the answer never tells which). An admin key sees every project's. Ferry's keys belong to
projects, not users: `group_by=user_id` answers `user_id: null`, and a `user_ids` filter matches
nothing. Every Ferry completion is served at the `default` tier.
"""

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import Query, Request
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    false,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import InvalidRequestError
from core.tables import ApiKey, Job, JobStatus
from core.validation import check_range, check_storable
from core.wire.usage import (
    USAGE_GROUPS,
    UsageCompletionsResult,
    UsageGroup,
    UsageResponse,
    UsageTimeBucket,
)

# Seconds in a bucket of each width.
WIDTHS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
# Buckets per page, OpenAI's default and maximum for each width.
LIMITS: dict[str, tuple[int, int]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
# The last second a time may name: 9999-12-31T23:59:59Z, past which no timestamp goes.
MAX_TIME = 253_402_300_799
# The tier every Ferry completion is served at.
SERVICE_TIER = "default"
PAGE_PREFIX = "page_"
# Values one array parameter may hold.
MAX_VALUES = 1000
_LISTS = ("project_ids", "user_ids", "api_key_ids", "models", "group_by")

_TIME = {"minimum": 0, "maximum": MAX_TIME}
_Strings = Annotated[list[str], Query(default_factory=list)]


@dataclass(frozen=True)
class UsageQuery:
    """A usage request's parameters, checked: times in Unix seconds, the width in seconds; a
    filter is None when not given; `page` is where the page starts, from the cursor."""

    start_time: int
    end_time: int | None
    width: int
    limit: int
    project_ids: tuple[str, ...] | None = None
    user_ids: tuple[str, ...] | None = None
    api_key_ids: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    batch: bool | None = None
    group_by: tuple[UsageGroup, ...] = ()
    page: int | None = None


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_value")


def listed(name: str, values: Sequence[str]) -> tuple[str, ...] | None:
    """An array parameter's values, each once, in order; None if none was given. More than
    MAX_VALUES are refused: each is a parameter of the statement, and Postgres takes 32,767."""
    if not values:
        return None
    if len(values) > MAX_VALUES:
        raise InvalidRequestError(
            f"Invalid '{name}': {len(values)} values, above the maximum of {MAX_VALUES}.",
            param=name,
            code="array_above_max_length",
        )
    check_storable(list(values), name)
    return tuple(dict.fromkeys(values))


def groups_of(values: Sequence[str]) -> tuple[UsageGroup, ...]:
    """`group_by`'s fields, each once; OpenAI's 400 for one it does not have."""
    for value in values:
        if value not in USAGE_GROUPS:
            raise _invalid(
                f"Invalid value for 'group_by': '{value}'. Supported values are: "
                + ", ".join(f"'{g}'" for g in USAGE_GROUPS)
                + ".",
                "group_by",
            )
    return tuple(dict.fromkeys(cast(list[UsageGroup], values)))


def width_of(bucket_width: str) -> int:
    """A bucket width's seconds; OpenAI's 400 for a width it does not have."""
    if bucket_width not in WIDTHS:
        raise _invalid(
            f"Invalid value for 'bucket_width': '{bucket_width}'. Supported values are: "
            "'1m', '1h' and '1d'.",
            "bucket_width",
        )
    return WIDTHS[bucket_width]


def batch_of(value: str | None) -> bool | None:
    """`batch` as JSON writes a boolean; OpenAI's 400 for anything else (`1`, `yes`), which
    FastAPI would take for one."""
    if value is None:
        return None
    if value not in ("true", "false"):
        raise InvalidRequestError(
            "Invalid type for 'batch': expected a boolean, 'true' or 'false'.",
            param="batch",
            code="invalid_type",
        )
    return value == "true"


def encode_page(start: int) -> str:
    """The cursor of a page that starts at `start` (Unix seconds)."""
    return PAGE_PREFIX + base64.urlsafe_b64encode(start.to_bytes(8, "big")).decode()


def decode_page(page: str, start_time: int) -> int:
    """Where the page `page` names starts; OpenAI's 400 for a cursor no answer gave with this
    `start_time`."""
    try:
        raw = base64.urlsafe_b64decode(page.removeprefix(PAGE_PREFIX).encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    start = int.from_bytes(raw, "big")
    if not page.startswith(PAGE_PREFIX) or len(raw) != 8 or not start_time < start <= MAX_TIME:
        raise _invalid("Invalid 'page': not a cursor from a previous answer to this query.", "page")
    return start


def usage_query(
    request: Request,
    *,
    start_time: Annotated[int, Query(json_schema_extra=_TIME)],
    end_time: Annotated[int | None, Query(json_schema_extra=_TIME)] = None,
    bucket_width: Annotated[str, Query(json_schema_extra={"enum": list(WIDTHS)})] = "1d",
    project_ids: _Strings,
    user_ids: _Strings,
    api_key_ids: _Strings,
    models: _Strings,
    batch: bool | None = None,
    group_by: Annotated[
        list[str],
        Query(
            default_factory=list,
            json_schema_extra={"items": {"type": "string", "enum": list(USAGE_GROUPS)}},
        ),
    ],
    limit: Annotated[int | None, Query(json_schema_extra={"minimum": 1, "maximum": 1440})] = None,
    page: str | None = None,
) -> UsageQuery:
    """The usage query, checked. An array is given as OpenAI's document has it, a parameter
    repeated (`models=a&models=b`), or as OpenAI's SDKs send it (`models[]=a&models[]=b`)."""
    # Read from the query string itself, in its order, whichever way each value is written;
    # the parameters above describe them in the document.
    items = request.query_params.multi_items()
    arrays = {name: [v for k, v in items if k in (name, f"{name}[]")] for name in _LISTS}
    check_range(start_time, 0, MAX_TIME, "start_time")
    if end_time is not None:
        check_range(end_time, 0, MAX_TIME, "end_time")
        if end_time <= start_time:
            raise _invalid(
                f"Invalid 'end_time': {end_time} is not after 'start_time' ({start_time}).",
                "end_time",
            )
    width = width_of(bucket_width)
    default_limit, max_limit = LIMITS[bucket_width]
    if limit is not None:
        check_range(limit, 1, max_limit, "limit")
    return UsageQuery(
        start_time=start_time,
        end_time=end_time,
        width=width,
        limit=default_limit if limit is None else limit,
        project_ids=listed("project_ids", arrays["project_ids"]),
        user_ids=listed("user_ids", arrays["user_ids"]),
        api_key_ids=listed("api_key_ids", arrays["api_key_ids"]),
        models=listed("models", arrays["models"]),
        batch=batch_of(request.query_params.get("batch")),
        group_by=groups_of(arrays["group_by"]),
        page=None if page is None else decode_page(page, start_time),
    )


@dataclass(frozen=True)
class BucketPage:
    """The buckets of one page, [start, end) each, and where the next page starts (None if
    this is the last)."""

    buckets: list[tuple[int, int]]
    next_start: int | None

    @property
    def start(self) -> int:
        return self.buckets[0][0]

    @property
    def end(self) -> int:
        return self.buckets[-1][1]


def range_end(end_time: int | None, width: int, now: int) -> int:
    """Where the range ends: `end_time`, but no later than the end of the bucket holding `now`."""
    now_bucket_end = now - now % width + width
    return now_bucket_end if end_time is None else min(end_time, now_bucket_end)


def bucket_page(start: int, end: int, width: int, limit: int) -> BucketPage:
    """Up to `limit` buckets from `start` to `end` on UTC's grid of `width` seconds: the first
    starts at `start`, the last ends at `end` at the latest."""
    buckets: list[tuple[int, int]] = []
    at = start
    while at < end and len(buckets) < limit:
        edge = min(at - at % width + width, end)
        buckets.append((at, edge))
        at = edge
    return BucketPage(buckets, at if at < end else None)


# Written out rather than bound: the usage index's own predicate, which a parameter could not
# prove to the planner once a prepared statement's plan is generic.
_SUCCEEDED = Job.status == literal_column(f"'{JobStatus.succeeded.value}'")


def _scope(key: ApiKey, query: UsageQuery) -> list[ColumnElement[bool]]:
    """The jobs counted: those that succeeded, of the key's scope, through the filters."""
    where: list[ColumnElement[bool]] = [_SUCCEEDED]
    if not key.admin:
        where.append(Job.project == key.project)
    if query.project_ids is not None:
        where.append(Job.project.in_(query.project_ids))
    if query.api_key_ids is not None:
        where.append(Job.api_key_id.in_(query.api_key_ids))
    if query.models is not None:
        where.append(Job.model.in_(query.models))
    if query.batch is not None:
        where.append(Job.batch_id.is_not(None) if query.batch else Job.batch_id.is_(None))
    if query.user_ids is not None:
        # No job belongs to a user: a user filter matches none.
        where.append(false())
    return where


# The columns each group reads; user_id and service_tier are the same for every job.
_GROUP_COLUMNS: dict[UsageGroup, Any] = {
    "project_id": Job.project,
    "api_key_id": Job.api_key_id,
    "model": Job.model,
    "batch": Job.batch_id.is_not(None),
}


def sums(key: ApiKey, query: UsageQuery, cut: BucketPage) -> Select[Any]:
    """Per bucket (its start) and group: prompt, cached and completion tokens, requests, then the
    grouped columns in `query.group_by`'s order."""
    grouped = [_GROUP_COLUMNS[g] for g in query.group_by if g in _GROUP_COLUMNS]
    # Each job's bucket: its start on the grid, or the page's start for the first, partial one.
    # One expression object in SELECT and GROUP BY, so that both carry the same parameters.
    bucket = func.greatest(
        func.floor(func.extract("epoch", Job.finished_at) / query.width) * query.width,
        literal(cut.start, BigInteger),
    ).cast(BigInteger)
    return (
        select(
            bucket,
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.cached_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.count(),
            *grouped,
        )
        .where(
            *_scope(key, query),
            Job.finished_at >= func.to_timestamp(literal(cut.start, BigInteger)),
            Job.finished_at < func.to_timestamp(literal(cut.end, BigInteger)),
        )
        .group_by(bucket, *grouped)
    )


def page_of(query: UsageQuery, cut: BucketPage, rows: Iterable[Sequence[Any]]) -> UsageResponse:
    """The page of `cut`'s buckets from the rows of `sums`: every bucket, empty ones too; in
    each, its groups ordered by their values."""
    grouped = [g for g in query.group_by if g in _GROUP_COLUMNS]
    results: dict[int, list[UsageCompletionsResult]] = {s: [] for s, _ in cut.buckets}
    for at, prompt, cached, completion, requests, *values in rows:
        groups: dict[str, Any] = dict(zip(grouped, values, strict=True))
        if "service_tier" in query.group_by:
            groups["service_tier"] = SERVICE_TIER
        results[int(at)].append(
            UsageCompletionsResult.of(
                int(prompt), int(cached), int(completion), int(requests), **groups
            )
        )
    for found in results.values():
        found.sort(key=lambda r: [(getattr(r, g) is None, str(getattr(r, g))) for g in grouped])
    return UsageResponse(
        data=[
            UsageTimeBucket(start_time=s, end_time=e, results=results[s]) for s, e in cut.buckets
        ],
        has_more=cut.next_start is not None,
        next_page=None if cut.next_start is None else encode_page(cut.next_start),
    )


async def completions(session: AsyncSession, key: ApiKey, query: UsageQuery) -> UsageResponse:
    """A page of completions usage, of what `key` may see."""
    now = int(await session.scalar(select(func.floor(func.extract("epoch", func.now())))) or 0)
    start = query.start_time if query.page is None else query.page
    cut = bucket_page(start, range_end(query.end_time, query.width, now), query.width, query.limit)
    if not cut.buckets:
        return UsageResponse(data=[], has_more=False, next_page=None)
    rows = await session.execute(sums(key, query, cut))
    return page_of(query, cut, rows)
