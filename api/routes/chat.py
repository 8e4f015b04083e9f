from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api import completions
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.wire import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "With `stream: true`: `chat.completion.chunk` events, "
                        "then `data: [DONE]`.",
                    }
                }
            }
        },
        **ERROR_RESPONSES,
        504: ERROR_RESPONSES[503],
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest, key: ApiKeyDep, session: SessionDep, ctx: ContextDep
):
    """Creates a model response for the given chat conversation."""
    job = await completions.submit(session, key, body)
    if body.stream:
        events = await completions.run_and_stream(ctx, job)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    job = await completions.run_and_wait(ctx, job)
    # Stored already in OpenAI's exact shape: sent as it is, not re-serialized with nulls.
    return JSONResponse(completions.result_of(job))
