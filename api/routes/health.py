from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select, text

from api.deps import ContextDep
from core.tables import ServedModel

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    # What is not answering: postgres, redis, "worker for model NAME".
    missing: list[str]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness},
        503: {"model": Readiness, "description": "Something it needs is missing"},
    },
)
async def readyz(ctx: ContextDep) -> JSONResponse:
    """Ready when Postgres and Redis answer and every served model has a live worker."""
    missing: list[str] = []
    served: list[str] = []
    try:
        async with ctx.sessions() as session:
            await session.execute(text("SELECT 1"))
            served = list(await session.scalars(select(ServedModel.name)))
    except Exception:
        missing.append("postgres")
    try:
        await ctx.redis.ping()
        live = {beat.model for beat in await ctx.live_workers()}
    except Exception:
        missing.append("redis")
        live = set()
    if "redis" not in missing:
        missing += [f"worker for model {name}" for name in served if name not in live]
        if not served and not live:
            missing.append("worker")
    body = {"status": "ready" if not missing else "unavailable", "missing": missing}
    return JSONResponse(body, status_code=200 if not missing else 503)
