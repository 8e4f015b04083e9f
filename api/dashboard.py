"""What the dashboard and /metrics show, read at request time from Postgres and Redis.

Every query stays on an index: job counts per (model, status) are one index range each
(ix_jobs_model_status), a batch's counts come from ix_jobs_batch_status, running jobs per worker
from ix_jobs_running_worker, and throughput from ix_jobs_finished_at, which carries the tokens.
One project's counts and throughput (what an ordinary key's dashboard shows) read the rows of
those same ranges to keep that project's.
"""

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    String,
    column,
    func,
    literal,
    or_,
    select,
    text,
    true,
    values,
)
from sqlalchemy.ext.asyncio import AsyncSession

from api.throttled import LIMITS, Throttled
from core.queue import FailedCheck, WorkerBeat
from core.tables import Batch, BatchStatus, Job, JobStatus, Project, ServedModel

# Batches whose jobs may still move (or whose files are being written).
UNFINISHED = (
    BatchStatus.validating,
    BatchStatus.in_progress,
    BatchStatus.finalizing,
    BatchStatus.cancelling,
)
# Jobs not yet ended.
LIVE = (JobStatus.queued, JobStatus.running)
# A batch stays on the dashboard this long after it ended.
RECENT_SECONDS = 300
# The throughput figure beside the chart: the chart's buckets of the last minute.
LAST_MINUTE_SECONDS = 60


async def job_counts(
    session: AsyncSession,
    statuses: Iterable[JobStatus] = tuple(JobStatus),
    project: str | None = None,
) -> dict[tuple[str, str], int]:
    """Jobs per (model, status), for every served model and each of `statuses`, zeros included;
    `project` counts only that project's.

    Queued and running jobs are few and cheap to count; the ended ones are most of the table
    (about 25 ms per million rows and status).
    """
    pairs = values(column("status", String), name="statuses").data(
        [(status.value,) for status in statuses]
    )
    # One correlated count per (model, status): an index-only range scan each, where one
    # GROUP BY would read the whole index. A project's count reads the rows of that range.
    scope: list[ColumnElement[bool]] = [Job.model == ServedModel.name, Job.status == pairs.c.status]
    if project is not None:
        scope.append(Job.project == project)
    count = select(func.count()).select_from(Job).where(*scope).scalar_subquery()
    # The planner cannot tell a status's rows from another's here: its estimate would start JIT
    # compilation, which costs more than the counts themselves.
    await session.execute(text("SET LOCAL jit = off"))
    rows = await session.execute(
        select(ServedModel.name, pairs.c.status, count).select_from(
            ServedModel.__table__.join(pairs, true())
        )
    )
    return {(model, status): int(n) for model, status, n in rows}


@dataclass
class BatchProgress:
    id: str
    status: str
    model: str | None
    created_at: int
    ended_at: int | None
    total: int
    completed: int
    failed: int
    running: int
    metadata: dict[str, str] | None

    def view(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _count(batch_status: JobStatus) -> Any:
    return (
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == Batch.id, Job.status == batch_status)
        .scalar_subquery()
    )


async def batches(
    session: AsyncSession,
    project: str | None = None,
    recent: bool = False,
    limit: int | None = 50,
) -> list[BatchProgress]:
    """Batches not yet ended (newest first), with their request counts as the Batch API gives
    them: completed = succeeded, failed = failed + invalid lines.

    `project` keeps one project's; `recent` adds those that ended in the last RECENT_SECONDS.
    """
    ended = func.coalesce(Batch.completed_at, Batch.failed_at, Batch.expired_at, Batch.cancelled_at)
    shown: ColumnElement[bool] = Batch.status.in_(UNFINISHED)
    if recent:
        shown = or_(shown, ended > func.now() - timedelta(seconds=RECENT_SECONDS))
    query = select(
        Batch.id,
        Batch.status,
        Batch.model,
        Batch.created_at,
        ended,
        Batch.total,
        _count(JobStatus.succeeded),
        _count(JobStatus.failed) + Batch.invalid,
        _count(JobStatus.running),
        Batch.metadata_,
    ).where(shown)
    if project is not None:
        query = query.where(Batch.project == project)
    rows = await session.execute(
        query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    )
    return [
        BatchProgress(
            id=row[0],
            status=BatchStatus(row[1]).value,
            model=row[2],
            created_at=int(row[3].timestamp()),
            ended_at=int(row[4].timestamp()) if row[4] is not None else None,
            total=int(row[5]),
            completed=int(row[6]),
            failed=int(row[7]),
            running=int(row[8]),
            metadata=row[9],
        )
        for row in rows
    ]


async def running_per_worker(session: AsyncSession) -> dict[str, int]:
    """Running jobs per worker id."""
    rows = await session.execute(
        select(Job.worker, func.count())
        .where(Job.status == JobStatus.running, Job.worker.is_not(None))
        .group_by(Job.worker)
    )
    return {str(worker): int(n) for worker, n in rows}


def worker_view(beat: WorkerBeat, running: int) -> dict[str, Any]:
    return {
        "id": beat.worker_id,
        "model": beat.model,
        "hostname": beat.hostname,
        "pid": beat.pid,
        "started_at": beat.started_at,
        "seen_at": beat.seen_at,
        "running": running,
        "self_check": beat.self_check,
    }


def failed_check_view(failure: FailedCheck) -> dict[str, Any]:
    return {
        "id": failure.worker_id,
        "model": failure.model,
        "hostname": failure.hostname,
        "at": failure.at,
    }


def refused_model_view(failure: FailedCheck) -> dict[str, Any]:
    """A refusal as any key may see it: which model, when; not which host."""
    return {"model": failure.model, "at": failure.at}


def models_view(
    beats: list[WorkerBeat], counts: dict[tuple[str, str], int]
) -> list[dict[str, Any]]:
    """Per model: live workers and its queue (queued and running jobs)."""
    names = sorted({model for model, _ in counts} | {beat.model for beat in beats})
    return [
        {
            "model": name,
            "workers": sum(1 for beat in beats if beat.model == name),
            "queued": counts.get((name, JobStatus.queued.value), 0),
            "running": counts.get((name, JobStatus.running.value), 0),
        }
        for name in names
    ]


def _sums(buckets: list[dict[str, Any]], seconds: int) -> dict[str, Any]:
    """What `buckets` add up to, over the `seconds` they cover."""
    tokens = sum(b["output_tokens"] for b in buckets)
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "completions": sum(b["completions"] for b in buckets),
        "output_tokens_per_second": tokens / seconds,
    }


async def throughput(
    session: AsyncSession, minutes: int = 10, bucket_seconds: int = 10, project: str | None = None
) -> dict[str, Any]:
    """Output tokens and completions per `bucket_seconds` over the last `minutes` (oldest first),
    with the sums of the last minute's buckets and of all of them; `project` counts only that
    project's jobs.

    The buckets end at the database's clock, in whole seconds, and are all whole: the newest holds
    the last `bucket_seconds`. So no bar is still filling, and the last minute is the last
    buckets, summed here rather than by each reader. A job's output tokens all count at its end,
    when its result is stored: a worker stores a batch's results many at a time.
    """
    end = int(await session.scalar(select(func.floor(func.extract("epoch", func.now())))) or 0)
    count = max(1, (minutes * 60) // bucket_seconds)
    start = end - count * bucket_seconds
    # How many whole buckets before `end` a job ended: 0 is the newest bucket.
    back = func.floor(
        (literal(end, BigInteger) - func.extract("epoch", Job.finished_at)) / bucket_seconds
    ).cast(Integer)
    scope: list[ColumnElement[bool]] = [
        Job.finished_at.is_not(None),
        Job.finished_at > func.to_timestamp(start),
        # Jobs stored since `end` wait for the next read, rather than land past the chart.
        Job.finished_at <= func.to_timestamp(end),
        Job.completion_tokens.is_not(None),
    ]
    if project is not None:
        scope.append(Job.project == project)
    rows = await session.execute(
        select(back, func.coalesce(func.sum(Job.completion_tokens), 0), func.count())
        .where(*scope)
        .group_by(back)
    )
    found = {int(k): (int(tokens or 0), int(n)) for k, tokens, n in rows}
    buckets = [
        {
            "start": start + i * bucket_seconds,
            "output_tokens": found.get(count - 1 - i, (0, 0))[0],
            "completions": found.get(count - 1 - i, (0, 0))[1],
        }
        for i in range(count)
    ]
    minute = buckets[-max(1, min(count, LAST_MINUTE_SECONDS // bucket_seconds)) :]
    return {
        "now": end,
        "bucket_seconds": bucket_seconds,
        "buckets": buckets,
        "last_minute": _sums(minute, len(minute) * bucket_seconds) | {"buckets": len(minute)},
        "total": _sums(buckets, count * bucket_seconds),
    }


# Tokens used are summed over this many seconds: the dashboard's and /metrics' "last hour".
TOKENS_SECONDS = 3600
# A job is a batch's line or an interactive request; its usage, in the order summed.
KINDS = ("interactive", "batch")
TOKEN_KINDS = ("prompt", "completion", "cached")


async def project_jobs(
    session: AsyncSession, project: str | None = None
) -> dict[tuple[str, str, str, str], int]:
    """Jobs queued and running per (project, model, kind, status), kind `interactive` or `batch`;
    `project` counts only that project's. Only what is there: no zeros."""
    pairs = values(column("status", String), name="statuses").data(
        [(status.value,) for status in LIVE]
    )
    batch = Job.batch_id.is_not(None).label("batch")
    # Per served model and status, a range of ix_jobs_model_status, whose rows are read for
    # their project: live jobs only, never the ended ones that fill the table.
    scope: list[ColumnElement[bool]] = [Job.model == ServedModel.name, Job.status == pairs.c.status]
    if project is not None:
        scope.append(Job.project == project)
    per = (
        select(Job.project, batch, func.count().label("n"))
        .where(*scope)
        .group_by(Job.project, batch)
        .lateral("per")
    )
    await session.execute(text("SET LOCAL jit = off"))
    rows = await session.execute(
        select(ServedModel.name, pairs.c.status, per.c.project, per.c.batch, per.c.n).select_from(
            ServedModel.__table__.join(pairs, true()).join(per, true())
        )
    )
    return {
        (owner, model, "batch" if is_batch else "interactive", status): int(n)
        for model, status, owner, is_batch, n in rows
    }


async def project_tokens(
    session: AsyncSession, project: str | None = None, seconds: int = TOKENS_SECONDS
) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Prompt, completion and cached tokens per (project, model) of the jobs that succeeded in
    the last `seconds`: the engine's own usage, from the rows the Usage API sums."""
    scope: list[ColumnElement[bool]] = [
        Job.status == JobStatus.succeeded,
        Job.finished_at > func.now() - timedelta(seconds=seconds),
    ]
    if project is not None:
        scope.append(Job.project == project)
    rows = await session.execute(
        select(
            Job.project,
            Job.model,
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.cached_tokens), 0),
        )
        .where(*scope)
        .group_by(Job.project, Job.model)
    )
    return {(p, m): (int(a or 0), int(b or 0), int(c or 0)) for p, m, a, b, c in rows}


async def project_names(session: AsyncSession) -> list[str]:
    """Every project created (admin-made: few)."""
    return list(await session.scalars(select(Project.name).order_by(Project.name)))


class LiveJobs(BaseModel):
    interactive: int
    batch: int


class TokensUsed(BaseModel):
    prompt: int
    completion: int
    cached: int


class Refusals(BaseModel):
    """Requests refused, by the limit that refused them (429s; batches failed for
    `batch_queue_tokens`), and all of them."""

    rpm: int
    tpm: int
    max_concurrent: int
    batch_queue_tokens: int
    all: int


class ProjectFigures(BaseModel):
    """A project's row: its jobs queued and running now, its tokens used in the last hour, its
    requests refused by its limits in the last hour and in all (since Redis started empty)."""

    project: str
    queued: LiveJobs
    running: LiveJobs
    tokens_last_hour: TokensUsed
    throttled_last_hour: Refusals
    throttled_total: Refusals


class WorkersView(BaseModel):
    """GET /v1/dashboard/workers: `project` with the project scope, `workers` with the fleet's."""

    object: Literal["dashboard.workers"]
    scope: Literal["project", "fleet"]
    project: str | None = None
    workers: list[dict[str, Any]] | None = None
    models: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    projects: list[ProjectFigures]


def projects_view(
    names: Iterable[str],
    jobs: dict[tuple[str, str, str, str], int],
    tokens: dict[tuple[str, str], tuple[int, int, int]],
    refused: Throttled,
) -> list[ProjectFigures]:
    """One row per project (of `names`, and any other with figures), summed over its models: its
    jobs queued and running (interactive and batch), its tokens of the last hour and its
    requests refused by its limits, in the last hour and in all, by limit."""
    live: Tally[tuple[str, str, str]] = Tally()
    for (project, _, kind, status), n in jobs.items():
        live[project, status, kind] += n
    used: dict[str, list[int]] = {}
    for (project, _), counts in tokens.items():
        sums = used.setdefault(project, [0, 0, 0])
        for i, n in enumerate(counts):
            sums[i] += n

    def jobs_of(project: str, status: JobStatus) -> LiveJobs:
        return LiveJobs(**{kind: live[project, status.value, kind] for kind in KINDS})

    def refusals(counts: dict[tuple[str, str, str], int], project: str) -> Refusals:
        by_limit = dict.fromkeys(LIMITS, 0)
        for (owner, _, limit), n in counts.items():
            if owner == project:
                by_limit[limit] = by_limit.get(limit, 0) + n
        return Refusals(**by_limit, all=sum(by_limit.values()))

    shown = set(names) | {k[0] for k in live} | set(used)
    shown |= {k[0] for k in refused.total} | {k[0] for k in refused.last_hour}
    return [
        ProjectFigures(
            project=project,
            queued=jobs_of(project, JobStatus.queued),
            running=jobs_of(project, JobStatus.running),
            tokens_last_hour=TokensUsed(
                **dict(zip(TOKEN_KINDS, used.get(project, [0, 0, 0]), strict=True))
            ),
            throttled_last_hour=refusals(refused.last_hour, project),
            throttled_total=refusals(refused.total, project),
        )
        for project in sorted(shown)
    ]


# An endpoint whose last failure is this recent is listed as failing, its circuit open or not.
FAILING_SECONDS = 3600


class FailingWebhook(BaseModel):
    id: str
    project: str
    url: str
    circuit: Literal["open", "closed"]
    consecutive_failures: int
    # Unix seconds.
    last_failure_at: int | None
    pending: int


class WebhooksView(BaseModel):
    object: Literal["dashboard.webhooks"]
    scope: Literal["project", "fleet"]
    # The age of the oldest event not yet delivered (None: none waits).
    oldest_pending_seconds: float | None
    open_circuits: int
    failing: list[FailingWebhook]


_WEBHOOK_HEALTH = text(
    """
    SELECT
        (SELECT extract(epoch FROM now() - min(ev.created_at))
         FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
         WHERE d.status = 'pending' AND (CAST(:project AS text) IS NULL OR ev.project = :project)),
        (SELECT count(*) FROM webhook_endpoints e
         WHERE e.circuit_open_until > now()
           AND (CAST(:project AS text) IS NULL OR e.project = :project))
    """
)
_FAILING_WEBHOOKS = text(
    """
    SELECT e.id, e.project, e.url, e.circuit_open_until > now() AS open,
           e.consecutive_failures, extract(epoch FROM e.last_failure_at)::bigint AS failed_at,
           (SELECT count(*) FROM webhook_deliveries d
            WHERE d.endpoint_id = e.id AND d.status = 'pending') AS pending
    FROM webhook_endpoints e
    WHERE (CAST(:project AS text) IS NULL OR e.project = :project)
      AND (e.circuit_open_until > now() OR e.consecutive_failures > 0
           OR e.last_failure_at > now() - make_interval(secs => :seconds))
    ORDER BY e.last_failure_at DESC NULLS LAST, e.id
    LIMIT 100
    """
)


async def webhook_health(session: AsyncSession, project: str | None = None) -> tuple[float, int]:
    """The age in seconds of the oldest undelivered event (0 if none), and the endpoints whose
    circuit is open."""
    oldest, open_circuits = (await session.execute(_WEBHOOK_HEALTH, {"project": project})).one()
    return float(oldest or 0.0), int(open_circuits)


async def webhooks_view(session: AsyncSession, project: str | None = None) -> WebhooksView:
    """Endpoints whose circuit is open or that failed in the last hour."""
    oldest, open_circuits = (await session.execute(_WEBHOOK_HEALTH, {"project": project})).one()
    rows = await session.execute(
        _FAILING_WEBHOOKS, {"project": project, "seconds": FAILING_SECONDS}
    )
    return WebhooksView(
        object="dashboard.webhooks",
        scope="project" if project is not None else "fleet",
        oldest_pending_seconds=None if oldest is None else round(float(oldest), 1),
        open_circuits=int(open_circuits),
        failing=[
            FailingWebhook(
                id=row.id,
                project=row.project,
                url=row.url,
                circuit="open" if row.open else "closed",
                consecutive_failures=row.consecutive_failures,
                last_failure_at=row.failed_at,
                pending=row.pending,
            )
            for row in rows
        ],
    )
