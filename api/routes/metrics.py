from typing import Annotated

from fastapi import APIRouter, Header, Response

from api import metrics
from api.deps import ContextDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(
    ctx: ContextDep, accept: Annotated[str | None, Header()] = None
) -> Response:
    """Prometheus metrics: HTTP traffic, jobs, queue depth, batch progress, live workers."""
    body, content_type = await metrics.exposition(ctx, accept)
    return Response(body, media_type=content_type)
