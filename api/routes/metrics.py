from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from api import metrics
from api.deps import ContextDep
from core.errors import AuthenticationError
from core.wire.responses import ErrorResponse

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": ErrorResponse, "description": "Missing or wrong scrape token"},
    },
)
async def prometheus_metrics(
    request: Request, ctx: ContextDep, accept: Annotated[str | None, Header()] = None
) -> Response:
    """Prometheus metrics: HTTP traffic, jobs, queue depth, batch progress, live workers, and
    per project its jobs queued and running, tokens used and requests throttled. The scraper
    sends FERRY_METRICS_TOKEN as a bearer token; with none set, every scrape is 401."""
    # Read here rather than declared: OpenAPI states it through the security scheme.
    try:
        metrics.check_scrape_token(ctx.settings, request.headers.get("authorization"))
    except AuthenticationError as exc:
        return JSONResponse(
            exc.envelope(), status_code=exc.status_code, headers={"WWW-Authenticate": "Bearer"}
        )
    body, content_type = await metrics.exposition(ctx, accept)
    return Response(body, media_type=content_type)
