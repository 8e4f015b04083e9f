from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from api import dashboard, throttled
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.headers import page_policy

PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"

router = APIRouter(tags=["dashboard"])


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    html = PAGE.read_text(encoding="utf-8")
    return html, page_policy(html)


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    """The live dashboard; it asks for an API key once and reads /v1/dashboard/*."""
    html, policy = _page()
    return HTMLResponse(
        html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy}
    )


@router.get(
    "/v1/dashboard/workers",
    response_model=dashboard.WorkersView,
    # Each scope's own fields: no `workers: null` for a project's key.
    response_model_exclude_unset=True,
    responses=ERROR_RESPONSES,
)
async def dashboard_workers(
    key: ApiKeyDep, ctx: ContextDep, session: SessionDep
) -> dashboard.WorkersView:
    """Per model, its live workers and its queue: the key's project's queued and running jobs
    (`scope: project`), or every project's with the workers themselves (host, pid, self-check,
    running jobs) for an admin key (`scope: fleet`); and the models whose workers refused to
    serve in the last hour because their engine failed its self-check. `projects`: per project
    (the key's own only, or every one for an admin key), its jobs queued and running, its tokens
    used in the last hour and its requests refused by its limits."""
    beats = await ctx.live_workers()
    refused = await ctx.failed_checks()
    throttled_now = await throttled.read(ctx.redis)
    if not key.admin:
        counts = await dashboard.job_counts(session, dashboard.LIVE, project=key.project)
        projects = dashboard.projects_view(
            [key.project],
            await dashboard.project_jobs(session, key.project),
            await dashboard.project_tokens(session, key.project),
            throttled_now.of(key.project),
        )
        return dashboard.WorkersView(
            object="dashboard.workers",
            scope="project",
            project=key.project,
            models=dashboard.models_view(beats, counts),
            refused=[dashboard.refused_model_view(f) for f in refused],
            projects=projects,
        )
    running = await dashboard.running_per_worker(session)
    counts = await dashboard.job_counts(session, dashboard.LIVE)
    projects = dashboard.projects_view(
        await dashboard.project_names(session),
        await dashboard.project_jobs(session),
        await dashboard.project_tokens(session),
        throttled_now,
    )
    beats.sort(key=lambda beat: (beat.model, beat.worker_id))
    return dashboard.WorkersView(
        object="dashboard.workers",
        scope="fleet",
        workers=[dashboard.worker_view(b, running.get(b.worker_id, 0)) for b in beats],
        models=dashboard.models_view(beats, counts),
        refused=[dashboard.failed_check_view(f) for f in refused],
        projects=projects,
    )


@router.get("/v1/dashboard/batches", responses=ERROR_RESPONSES)
async def dashboard_batches(key: ApiKeyDep, session: SessionDep) -> dict[str, Any]:
    """The project's batches in progress, and those that ended in the last five minutes."""
    rows = await dashboard.batches(session, project=key.project, recent=True)
    return {"object": "list", "data": [row.view() for row in rows]}


@router.get("/v1/dashboard/throughput", responses=ERROR_RESPONSES)
async def dashboard_throughput(
    key: ApiKeyDep,
    session: SessionDep,
    minutes: Annotated[int, Query(ge=1, le=60)] = 10,
    bucket: Annotated[int, Query(ge=1, le=600)] = 10,
) -> dict[str, Any]:
    """Output tokens and completions per `bucket` seconds, last `minutes`, and the sums of the
    last minute's buckets: the key's project's jobs, or every project's for an admin key."""
    project = None if key.admin else key.project
    return {
        "object": "dashboard.throughput",
        "scope": "fleet" if key.admin else "project",
        **await dashboard.throughput(session, minutes, bucket, project=project),
    }


@router.get(
    "/v1/dashboard/webhooks", response_model=dashboard.WebhooksView, responses=ERROR_RESPONSES
)
async def dashboard_webhooks(key: ApiKeyDep, session: SessionDep) -> dashboard.WebhooksView:
    """Webhook endpoints whose circuit is open or that failed in the last hour, the age of the
    oldest event not yet delivered and the open circuits: the key's project's, or every
    project's for an admin key."""
    return await dashboard.webhooks_view(session, None if key.admin else key.project)
