from typing import Annotated

from fastapi import APIRouter, Body, Depends

from api.batches import service as batches
from api.batches.ingest import ingest
from api.context import in_background
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.pagination import ListQuery, list_query
from core.wire.resources import BatchList, BatchObject, ExpiresAfter

router = APIRouter(prefix="/v1", tags=["batches"])

# OpenAI's batches list takes no `order`: newest first.
BatchListQuery = Annotated[ListQuery, Depends(list_query(default_order=None))]


@router.post("/batches", response_model=BatchObject, responses=ERROR_RESPONSES)
async def create_batch(
    key: ApiKeyDep,
    session: SessionDep,
    ctx: ContextDep,
    input_file_id: Annotated[str, Body()],
    endpoint: Annotated[str, Body()],
    completion_window: Annotated[str, Body()],
    metadata: Annotated[dict[str, str] | None, Body()] = None,
    output_expires_after: Annotated[ExpiresAfter | None, Body()] = None,
) -> BatchObject:
    """Creates a batch from an uploaded JSONL file; it is validated line by line, then run."""
    batch = await batches.create(
        session, key, input_file_id, endpoint, completion_window, metadata, output_expires_after
    )
    in_background(ingest(ctx, batch.id))
    return BatchObject.of(batch)


@router.get("/batches", response_model=BatchList, responses=ERROR_RESPONSES)
async def list_batches(key: ApiKeyDep, session: SessionDep, page: BatchListQuery) -> BatchList:
    """Lists the project's batches, newest first."""
    return await batches.list_batches(session, key, page)


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=ERROR_RESPONSES)
async def retrieve_batch(batch_id: str, key: ApiKeyDep, session: SessionDep) -> BatchObject:
    """Retrieves a batch, with its request counts."""
    return BatchObject.of(await batches.get(session, key, batch_id))


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=BatchObject,
    responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]},
)
async def cancel_batch(
    batch_id: str, key: ApiKeyDep, session: SessionDep, ctx: ContextDep
) -> BatchObject:
    """Cancels a batch: queued requests stop, running ones are aborted, finished ones kept."""
    return BatchObject.of(await batches.cancel(ctx, session, key, batch_id))
