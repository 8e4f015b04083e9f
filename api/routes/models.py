from fastapi import APIRouter
from sqlalchemy import select

from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.errors import NotFoundError
from core.tables import ServedModel
from core.wire.resources import Model, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


async def _live_models(ctx: ContextDep, session: SessionDep) -> list[Model]:
    live = {beat.model for beat in await ctx.live_workers()}
    if not live:
        return []
    rows = await session.scalars(
        select(ServedModel).where(ServedModel.name.in_(live)).order_by(ServedModel.name)
    )
    return [Model(id=row.name, created=int(row.first_served_at.timestamp())) for row in rows]


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(_: ApiKeyDep, ctx: ContextDep, session: SessionDep) -> ModelList:
    """Lists the models that live workers serve."""
    return ModelList(data=await _live_models(ctx, session))


@router.get("/models/{model}", response_model=Model, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, _: ApiKeyDep, ctx: ContextDep, session: SessionDep) -> Model:
    """Retrieves a model that a live worker serves."""
    for served in await _live_models(ctx, session):
        if served.id == model:
            return served
    raise NotFoundError(
        f"The model '{model}' does not exist or no worker serves it.",
        param="model",
        code="model_not_found",
    )
