"""The API's Prometheus metrics: its HTTP traffic, counted as it passes, and the state of jobs,
queues, batches and workers, read from Postgres and Redis when /metrics is scraped.

Every API process answers with the same state (it is read from the shared stores): aggregate
those gauges (and the refusals counted in Redis) with max(), not sum(), across API processes.
Labels name models, routes, states and projects (made by an admin: few), never a key or a batch.
"""

import asyncio
import hmac
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from api import dashboard, throttled
from api.context import ApiContext
from api.middleware import HttpMiddleware
from core.errors import AuthenticationError, MissingApiKeyError
from core.settings import ApiSettings
from core.tables import JobStatus

log = logging.getLogger(__name__)

# No `_created` series beside each counter: they double the output and Prometheus ignores them.
disable_created_metrics()

# A path that matches no route: one label value, whatever the path.
UNMATCHED = "<unmatched>"
# A batch whose model is not known yet (its file is still being read).
NO_MODEL = "<none>"
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

WEBHOOK_DELIVERIES = Counter(
    "ferry_webhook_deliveries",
    "Webhook delivery attempts by outcome, counted by the API process that made them: delivered, "
    "failed_attempt (to be tried again), refused (the URL resolved to a refused address), "
    "gave_up (72 hours after the event).",
    ["outcome"],
)
for _outcome in ("delivered", "failed_attempt", "refused", "gave_up"):
    WEBHOOK_DELIVERIES.labels(_outcome)


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


class HttpMetrics(HttpMiddleware):
    """Pure ASGI middleware: counts every HTTP request and times it to its response's end."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            batches = await dashboard.batches(session, limit=None)
            names = await dashboard.project_names(session)
            live = await dashboard.project_jobs(session)
            tokens = await dashboard.project_tokens(session)
            oldest, open_circuits = await dashboard.webhook_health(session)
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
        families += [jobs, depth, *_batch_families(batches)]
        families += _project_families(names, served, live, tokens)
        families += [
            GaugeMetricFamily(
                "ferry_webhook_oldest_pending_seconds",
                "Age of the oldest webhook event not yet delivered (0: none waits).",
                value=oldest,
            ),
            GaugeMetricFamily(
                "ferry_webhook_open_circuits",
                "Webhook endpoints whose circuit breaker is open (nothing is sent to them now).",
                value=open_circuits,
            ),
        ]
    try:
        beats = await ctx.live_workers()
        refused = await throttled.read(ctx.redis)
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
        families += [workers, _throttled_family(refused)]
    return [*families, up]


def _project_families(
    names: list[str],
    served: list[str],
    live: dict[tuple[str, str, str, str], int],
    tokens: dict[tuple[str, str], tuple[int, int, int]],
) -> list[Metric]:
    """Per project and model: jobs queued and running (zeros too, for every project and served
    model: a series that vanishes reads as missing, not as none), and the last hour's tokens."""
    jobs = GaugeMetricFamily(
        "ferry_project_jobs",
        "Jobs queued and running per project and model; kind: interactive or batch.",
        labels=["project", "model", "kind", "status"],
    )
    keys = {
        (project, model, kind, status.value)
        for project in {*names, *(k[0] for k in live)}
        for model in served
        for kind in dashboard.KINDS
        for status in dashboard.LIVE
    } | set(live)
    for key in sorted(keys):
        jobs.add_metric(list(key), live.get(key, 0))
    used = GaugeMetricFamily(
        "ferry_project_tokens_last_hour",
        "Tokens of the jobs that succeeded in the last hour, per project and model, from the "
        "jobs' own usage (as the Usage API sums it); type: prompt, completion, cached.",
        labels=["project", "model", "type"],
    )
    for (project, model), counts in sorted(tokens.items()):
        for kind, n in zip(dashboard.TOKEN_KINDS, counts, strict=True):
            used.add_metric([project, model, kind], n)
    return [jobs, used]


def _throttled_family(refused: throttled.Throttled) -> Metric:
    """Requests refused by a project's limits, counted in Redis: every API process's refusals,
    so every process reports the same."""
    family = CounterMetricFamily(
        "ferry_project_requests_throttled",
        "Requests refused by a project's limits, per project, model and limit (rpm, tpm, "
        "max_concurrent: 429s; batch_queue_tokens: batches failed), across API processes.",
        labels=["project", "model", "limit"],
    )
    for key, n in sorted(refused.total.items()):
        family.add_metric(list(key), n)
    return family


def _batch_families(batches: list[dashboard.BatchProgress]) -> list[Metric]:
    """Batches not yet ended, summed per model: how many in each status, and their requests."""
    in_status = GaugeMetricFamily(
        "ferry_batches",
        "Batches not yet ended, by model and status.",
        labels=["model", "status"],
    )
    progress = GaugeMetricFamily(
        "ferry_batch_requests",
        "Requests of the batches not yet ended, summed per model: completed, failed (with "
        "invalid lines), total.",
        labels=["model", "state"],
    )
    statuses: Tally[tuple[str, str]] = Tally()
    requests: Tally[tuple[str, str]] = Tally()
    for batch in batches:
        model = batch.model or NO_MODEL
        statuses[model, batch.status] += 1
        requests[model, "completed"] += batch.completed
        requests[model, "failed"] += batch.failed
        requests[model, "total"] += batch.total
    for (model, status), n in sorted(statuses.items()):
        in_status.add_metric([model, status], n)
    for (model, state), n in sorted(requests.items()):
        progress.add_metric([model, state], n)
    return [in_status, progress]


def check_scrape_token(settings: ApiSettings, authorization: str | None) -> None:
    """Let the scrape through if it bears FERRY_METRICS_TOKEN; otherwise AuthenticationError
    (also when no token is set: then nobody may scrape)."""
    token = settings.metrics_token.get_secret_value()
    scheme, _, given = (authorization or "").partition(" ")
    if not token:
        raise AuthenticationError(
            "Metrics are off: set FERRY_METRICS_TOKEN on the API and send it as a bearer token.",
            code=None,
        )
    if scheme.lower() != "bearer" or not given.strip():
        raise MissingApiKeyError("Send the scrape token as a bearer token.")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthenticationError("Incorrect scrape token.", code="invalid_scrape_token")


async def exposition(ctx: ApiContext, accept: str | None) -> tuple[bytes, str]:
    """The scrape's body in the format the scraper accepts, and its content type."""
    encode, content_type = choose_encoder(accept or "")
    return encode(_Scrape(await state(ctx))), content_type
