from fastapi import APIRouter

from api import projects
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.wire.resources import ProjectLimits

router = APIRouter(prefix="/v1", tags=["projects"])


@router.get("/projects/me/limits", response_model=ProjectLimits, responses=ERROR_RESPONSES)
async def my_project_limits(key: ApiKeyDep, session: SessionDep, ctx: ContextDep) -> ProjectLimits:
    """The key's project's limits on each model, and what they leave free now."""
    return await projects.limits_now(ctx, session, key)
