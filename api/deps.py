"""Typed dependencies: the process context, a database session, the caller's API key."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import ApiContext
from core.tables import ApiKey


def get_context(request: Request) -> ApiContext:
    return request.app.state.ctx


ContextDep = Annotated[ApiContext, Depends(get_context)]


async def get_session(ctx: ContextDep) -> AsyncIterator[AsyncSession]:
    async with ctx.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def get_api_key(request: Request) -> ApiKey:
    """The caller's key, resolved by the BearerAuth middleware."""
    return request.state.api_key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
