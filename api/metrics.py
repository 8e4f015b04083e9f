"""The API's Prometheus metrics: its HTTP traffic, counted as it passes, and the state of jobs,
queues, batches and workers, read from Postgres and Redis when /metrics is scraped.

Every API process answers with the same state (it is read from the shared stores): aggregate
those gauges with max(), not sum(), across API processes.
"""

import asyncio
import logging
import time
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard
from api.context import ApiContext
from core.tables import JobStatus

log = logging.getLogger(__name__)

# No `_created` series beside each counter: they double the output and Prometheus ignores them.
disable_created_metrics()

# A path that matches no route: one label value, whatever the path.
UNMATCHED = "<unmatched>"
# Synchronous completions may take minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUESTS = Counter(
    "ferry_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "ferry_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by method, route and status.",
    ["method", "route", "status"],
    buckets=BUCKETS,
)


def route_of(scope: Scope) -> str:
    """The template of the route that served (or would serve) the request, e.g.
    /v1/batches/{batch_id}; routing sets it, and requests answered before routing (401) look
    it up."""
    route = scope.get("route")
    if route is None and "app" in scope:
        # As the router picks: the first full match, else the first partial one (405).
        for candidate in scope["app"].router.routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and route is None:
                route = candidate
    return getattr(route, "path", None) or UNMATCHED


class HttpMetrics:
    """Pure ASGI middleware: counts every HTTP request and times it to its response's end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = (scope["method"], route_of(scope), str(status))
            HTTP_REQUESTS.labels(*labels).inc()
            HTTP_DURATION.labels(*labels).observe(time.perf_counter() - started)


class _EndedCounts:
    """Ended jobs per (model, status), recounted at most every `every` seconds: they are most of
    the table, and their count grows with it (about 25 ms per million jobs and status)."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.at = -every
        self.last: dict[tuple[str, str], int] = {}
        self.lock = asyncio.Lock()

    async def counts(self, session: AsyncSession) -> dict[tuple[str, str], int]:
        async with self.lock:
            if time.monotonic() - self.at >= self.every:
                ended = [status for status in JobStatus if status.is_final]
                self.last = await dashboard.job_counts(session, ended)
                self.at = time.monotonic()
        return self.last


_ENDED = _EndedCounts()


class _Scrape:
    """The process's own metrics, then the state read for this scrape."""

    def __init__(self, state: list[Metric]) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self.state


async def state(ctx: ApiContext) -> list[Metric]:
    """Jobs, queue depth and batch progress from Postgres; live workers from Redis."""
    up = GaugeMetricFamily(
        "ferry_metrics_source_up",
        "1 if the source answered this scrape (the gauges it feeds are missing otherwise).",
        labels=["source"],
    )
    families: list[Metric] = []
    served: list[str] = []
    try:
        async with ctx.sessions() as session:
            counts = await dashboard.job_counts(session, dashboard.LIVE)
            counts.update(await _ENDED.counts(session))
            batches = await dashboard.batches(session)
    except Exception as exc:
        log.warning("metrics: postgres unavailable: %s", exc)
        up.add_metric(["postgres"], 0)
    else:
        up.add_metric(["postgres"], 1)
        served = sorted({model for model, _ in counts})
        jobs = GaugeMetricFamily(
            "ferry_jobs",
            "Jobs by model and status (ended ones recounted at most once a minute).",
            labels=["model", "status"],
        )
        depth = GaugeMetricFamily(
            "ferry_queue_depth",
            "Jobs queued for a model, not yet taken by a worker.",
            labels=["model"],
        )
        for (model, status), n in sorted(counts.items()):
            jobs.add_metric([model, status], n)
            if status == JobStatus.queued.value:
                depth.add_metric([model], n)
        progress = GaugeMetricFamily(
            "ferry_batch_requests",
            "Requests of each batch in progress: completed, failed (with invalid lines), total.",
            labels=["batch_id", "state"],
        )
        for batch in batches:
            progress.add_metric([batch.id, "completed"], batch.completed)
            progress.add_metric([batch.id, "failed"], batch.failed)
            progress.add_metric([batch.id, "total"], batch.total)
        families += [jobs, depth, progress]
    try:
        beats = await ctx.live_workers()
    except Exception as exc:
        log.warning("metrics: redis unavailable: %s", exc)
        up.add_metric(["redis"], 0)
    else:
        up.add_metric(["redis"], 1)
        workers = GaugeMetricFamily(
            "ferry_workers",
            "Live workers per model (a fresh heartbeat in Redis).",
            labels=["model"],
        )
        for model in sorted(set(served) | {beat.model for beat in beats}):
            workers.add_metric([model], sum(1 for beat in beats if beat.model == model))
        families.append(workers)
    return [*families, up]


async def exposition(ctx: ApiContext, accept: str | None) -> tuple[bytes, str]:
    """The scrape's body in the format the scraper accepts, and its content type."""
    encode, content_type = choose_encoder(accept or "")
    return encode(_Scrape(await state(ctx))), content_type
