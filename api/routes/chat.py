from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Body, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from api import callbacks, completions, stored
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES, RATE_LIMITED
from api.pagination import ListQuery, list_query
from core.errors import InvalidRequestError
from core.wire.requests import ChatCompletionRequest
from core.wire.resources import (
    ChatCompletionDeleted,
    ChatCompletionList,
    ChatCompletionMessageList,
    StoredChatCompletion,
)
from core.wire.responses import ChatCompletion

router = APIRouter(prefix="/v1", tags=["chat"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Each event of the stream (as OpenAPI 3.2's `itemSchema` would say it).
_STREAM_RESPONSE = {
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string"}},
                "description": "With `stream: true`: events whose data is a "
                "`chat.completion.chunk` as JSON, then `[DONE]`.",
            }
        }
    }
}
# OpenAI's stored completions and messages lists: 20 at a time, oldest first.
StoredListQuery = Annotated[ListQuery, Depends(list_query())]


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: _STREAM_RESPONSE,
        202: {
            "model": StoredChatCompletion,
            "description": "With `Prefer: respond-async`: the queued completion to poll",
        },
        **ERROR_RESPONSES,
        409: ERROR_RESPONSES[400],
        **RATE_LIMITED,
        504: ERROR_RESPONSES[503],
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    key: ApiKeyDep,
    session: SessionDep,
    ctx: ContextDep,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ferry_callback_url: Annotated[str | None, Header(max_length=2048)] = None,
):
    """Creates a model response for the given chat conversation."""
    respond_async = "respond-async" in (prefer or "")
    if respond_async and body.stream:
        raise InvalidRequestError(
            "A streamed request cannot also ask for 'Prefer: respond-async'.", param="stream"
        )
    if ferry_callback_url is not None:
        await callbacks.check(session, key, ferry_callback_url, respond_async, ctx.settings)
    job, replayed, limit_headers = await completions.submit(
        session,
        key,
        body,
        idempotency_key,
        ctx.lookups,
        ctx.settings,
        ctx.limiter,
        notify=respond_async,
        callback_url=ferry_callback_url,
    )
    if replayed and body.stream:
        raise InvalidRequestError(
            f"A streamed request is not replayed; retrieve '{job.id}' instead.",
            param="stream",
            code="idempotency_key_reused",
        )
    if respond_async:
        if not replayed:
            await completions.enqueue(ctx, job)
        return JSONResponse(
            StoredChatCompletion.of(job).model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"/v1/chat/completions/{job.id}", **limit_headers},
        )
    if body.stream:
        events = await completions.run_and_stream(ctx, job)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**_SSE_HEADERS, **limit_headers}
        )
    job = await (completions.wait(ctx, job) if replayed else completions.run_and_wait(ctx, job))
    # Stored already in OpenAI's exact shape: sent as it is, not re-serialized with nulls.
    return JSONResponse(
        completions.result_of(job),
        headers=limit_headers,
        background=BackgroundTask(stored.mark_delivered, ctx, job),
    )


@router.get("/chat/completions", response_model=ChatCompletionList, responses=ERROR_RESPONSES)
async def list_chat_completions(
    request: Request,
    key: ApiKeyDep,
    session: SessionDep,
    page: StoredListQuery,
    model: str | None = None,
) -> ChatCompletionList:
    """Lists stored chat completions; filter with `model` and `metadata[key]=value`."""
    metadata = stored.metadata_filter(request.query_params.multi_items())
    return await stored.list_completions(session, key, page, model=model, metadata=metadata)


@router.get(
    "/chat/completions/{completion_id}",
    response_model=StoredChatCompletion,
    responses=ERROR_RESPONSES,
)
async def retrieve_chat_completion(
    completion_id: str,
    key: ApiKeyDep,
    session: SessionDep,
    ctx: ContextDep,
    background: BackgroundTasks,
) -> StoredChatCompletion:
    """Retrieves a chat completion: its status while queued or running, in full once done."""
    job = await stored.get_visible(session, key, completion_id)
    if job.status.is_final:
        background.add_task(stored.mark_delivered, ctx, job)
    return StoredChatCompletion.of(job)


@router.post(
    "/chat/completions/{completion_id}",
    response_model=StoredChatCompletion,
    responses=ERROR_RESPONSES,
)
async def update_chat_completion(
    completion_id: str,
    key: ApiKeyDep,
    session: SessionDep,
    metadata: Annotated[dict[str, str] | None, Body(embed=True)],
) -> StoredChatCompletion:
    """Updates a stored chat completion's metadata."""
    return await stored.update_metadata(session, key, completion_id, metadata)


@router.delete(
    "/chat/completions/{completion_id}",
    response_model=ChatCompletionDeleted,
    responses=ERROR_RESPONSES,
)
async def delete_chat_completion(
    completion_id: str, key: ApiKeyDep, session: SessionDep
) -> ChatCompletionDeleted:
    """Deletes a stored chat completion."""
    return await stored.delete(session, key, completion_id)


@router.get(
    "/chat/completions/{completion_id}/messages",
    response_model=ChatCompletionMessageList,
    responses=ERROR_RESPONSES,
)
async def list_chat_completion_messages(
    completion_id: str, key: ApiKeyDep, session: SessionDep, page: StoredListQuery
) -> ChatCompletionMessageList:
    """Lists the messages of a stored chat completion's request."""
    return await stored.list_messages(session, key, completion_id, page)


@router.post(
    "/chat/completions/{completion_id}/cancel",
    response_model=StoredChatCompletion,
    responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]},
)
async def cancel_chat_completion(
    completion_id: str, key: ApiKeyDep, session: SessionDep, ctx: ContextDep
) -> StoredChatCompletion:
    """Cancels a queued or running chat completion; the engine aborts it."""
    return await stored.cancel(ctx, session, key, completion_id)
