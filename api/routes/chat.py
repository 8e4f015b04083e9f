from fastapi import APIRouter

from api import completions
from api.deps import ApiKeyDep, ContextDep, SessionDep
from api.errors import ERROR_RESPONSES
from core.wire import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**ERROR_RESPONSES, 504: ERROR_RESPONSES[503]},
)
async def create_chat_completion(
    body: ChatCompletionRequest, key: ApiKeyDep, session: SessionDep, ctx: ContextDep
) -> dict:
    """Creates a model response for the given chat conversation."""
    job = await completions.submit(session, key, body)
    job = await completions.run_and_wait(ctx, job)
    return completions.result_of(job)
