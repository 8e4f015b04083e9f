from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from api import dashboard
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES

PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"

router = APIRouter(tags=["dashboard"])


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    """The live dashboard; it asks for an API key once and reads /v1/dashboard/*."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get("/v1/dashboard/workers", responses=ERROR_RESPONSES)
async def dashboard_workers(_: ApiKeyDep, ctx: ContextDep, session: SessionDep) -> dict[str, Any]:
    """Live workers (every project's: they are shared), per model its queue, and workers that
    refused to serve in the last hour because their engine failed its self-check."""
    beats = await ctx.live_workers()
    refused = await ctx.failed_checks()
    running = await dashboard.running_per_worker(session)
    counts = await dashboard.job_counts(session, dashboard.LIVE)
    beats.sort(key=lambda beat: (beat.model, beat.worker_id))
    return {
        "object": "dashboard.workers",
        "workers": [dashboard.worker_view(b, running.get(b.worker_id, 0)) for b in beats],
        "models": dashboard.models_view(beats, counts),
        "refused": [dashboard.failed_check_view(f) for f in refused],
    }


@router.get("/v1/dashboard/batches", responses=ERROR_RESPONSES)
async def dashboard_batches(key: ApiKeyDep, session: SessionDep) -> dict[str, Any]:
    """The project's batches in progress, and those that ended in the last five minutes."""
    rows = await dashboard.batches(session, project=key.project, recent=True)
    return {"object": "list", "data": [row.view() for row in rows]}


@router.get("/v1/dashboard/throughput", responses=ERROR_RESPONSES)
async def dashboard_throughput(
    _: ApiKeyDep,
    session: SessionDep,
    minutes: Annotated[int, Query(ge=1, le=60)] = 10,
    bucket: Annotated[int, Query(ge=1, le=600)] = 10,
) -> dict[str, Any]:
    """Output tokens and completions of every worker per `bucket` seconds, last `minutes`, and
    the sums of the last minute's buckets."""
    return {
        "object": "dashboard.throughput",
        **await dashboard.throughput(session, minutes, bucket),
    }
