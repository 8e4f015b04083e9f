"""A request's own one-off callback: `Ferry-Callback-URL` on a `Prefer: respond-async` chat
completion, sent the completion's end as a webhook event signed with its project's callback
secret (`ferry webhooks callback-secret`)."""

import asyncio

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core import webhooks
from core.errors import InvalidRequestError
from core.settings import ApiSettings
from core.tables import ApiKey, Project

CODE = "invalid_callback_url"


async def check(
    session: AsyncSession, key: ApiKey, url: str, respond_async: bool, settings: ApiSettings
) -> None:
    """400 unless the request is asynchronous, the URL may receive webhooks and the project has
    a callback secret to sign them with."""
    if not respond_async:
        raise InvalidRequestError(
            "The Ferry-Callback-URL header is only for asynchronous requests: send "
            "'Prefer: respond-async' with it.",
            code=CODE,
        )
    try:
        await asyncio.to_thread(webhooks.check_url, url, settings)
    except webhooks.RefusedUrl as exc:
        raise InvalidRequestError(f"Ferry-Callback-URL: {exc}", code=CODE) from None
    sealed = await session.scalar(
        select(Project.callback_secret_sealed).where(Project.name == key.project)
    )
    if sealed is None:
        raise InvalidRequestError(
            f"The project '{key.project}' has no callback secret to sign callbacks with: run "
            f"`ferry webhooks callback-secret --project {key.project}` first.",
            code=CODE,
        )
