from typing import Annotated

from fastapi import APIRouter, Depends

from api import usage
from api.deps import ApiKeyDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.usage import UsageQuery, usage_query
from core.wire.usage import UsageResponse

router = APIRouter(prefix="/v1", tags=["usage"])

UsageQueryDep = Annotated[UsageQuery, Depends(usage_query)]


@router.get(
    "/organization/usage/completions",
    response_model=UsageResponse,
    responses={400: ERROR_RESPONSES[400], 401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]},
)
async def usage_completions(
    key: ApiKeyDep, session: SessionDep, query: UsageQueryDep
) -> UsageResponse:
    """Gets completions usage per time bucket: tokens and requests of the completions that
    succeeded, by when they ended; the key's project's, or every project's for an admin key."""
    return await usage.completions(session, key, query)
