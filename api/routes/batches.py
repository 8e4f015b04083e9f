from typing import Annotated, Any

from fastapi import APIRouter, Body

from api.batches import service as batches
from api.batches.ingest import ingest
from api.context import in_background
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.wire.resources import BatchList, BatchObject

router = APIRouter(prefix="/v1", tags=["batches"])


@router.post(
    "/batches",
    response_model=None,
    responses={200: {"model": BatchObject}, **ERROR_RESPONSES},
)
async def create_batch(
    key: ApiKeyDep,
    session: SessionDep,
    ctx: ContextDep,
    input_file_id: Annotated[str, Body()],
    endpoint: Annotated[str, Body()],
    completion_window: Annotated[str, Body()],
    metadata: Annotated[dict[str, str] | None, Body()] = None,
) -> dict[str, Any]:
    """Creates a batch from an uploaded JSONL file; it is validated line by line, then run."""
    batch = await batches.create(session, key, input_file_id, endpoint, completion_window, metadata)
    in_background(ingest(ctx, batch.id))
    return await batches.view(session, batch)


@router.get(
    "/batches", response_model=None, responses={200: {"model": BatchList}, **ERROR_RESPONSES}
)
async def list_batches(
    key: ApiKeyDep, session: SessionDep, after: str | None = None, limit: int = 20
) -> dict[str, Any]:
    """Lists the project's batches, newest first."""
    return await batches.list_batches(session, key, after, limit)


@router.get(
    "/batches/{batch_id}",
    response_model=None,
    responses={200: {"model": BatchObject}, **ERROR_RESPONSES},
)
async def retrieve_batch(batch_id: str, key: ApiKeyDep, session: SessionDep) -> dict[str, Any]:
    """Retrieves a batch, with its request counts."""
    return await batches.view(session, await batches.get(session, key, batch_id))


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=None,
    responses={200: {"model": BatchObject}, **ERROR_RESPONSES, 409: ERROR_RESPONSES[400]},
)
async def cancel_batch(
    batch_id: str, key: ApiKeyDep, session: SessionDep, ctx: ContextDep
) -> dict[str, Any]:
    """Cancels a batch: queued requests stop, running ones are aborted, finished ones kept."""
    batch = await batches.cancel(ctx, session, key, batch_id)
    return await batches.view(session, batch)
