"""Bearer-key authentication for every `/v1` route, checked before the body is read."""

from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import send_error
from core.errors import (
    AuthenticationError,
    FerryError,
    MissingApiKeyError,
    ServiceUnavailableError,
)
from core.keys import hash_key
from core.tables import ApiKey

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
# What the lookup cache holds for a key that matches no active one.
_NO_SUCH_KEY = object()


class BearerAuth:
    """Pure ASGI middleware: resolves the key to `scope["state"]["api_key"]` or answers 401."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        try:
            key = await self._authenticate(scope)
        except FerryError as exc:
            challenge = [(b"www-authenticate", b"Bearer")] if exc.status_code == 401 else []
            await send_error(send, exc, *challenge)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> ApiKey:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MissingApiKeyError(_NO_KEY)
        ctx = scope["app"].state.ctx
        digest = hash_key(token)
        key = ctx.lookups.get(("key", digest))
        if key is _NO_SUCH_KEY:
            raise _incorrect(token)
        if key is not None:
            return key
        try:
            async with ctx.sessions() as session:
                key = await session.scalar(
                    select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
                )
        except Exception as exc:
            raise ServiceUnavailableError(
                "The database is unavailable; try again shortly."
            ) from exc
        if key is None:
            # A wrong key is refused from memory for as long as a right one is trusted: a client
            # retrying one costs no query. A key created meanwhile works once the entry expires
            # (FERRY_LOOKUP_CACHE_SECONDS) or the cache is cleared (a lookups-changed notice).
            ctx.lookups.put(("key", digest), _NO_SUCH_KEY)
            raise _incorrect(token)
        ctx.lookups.put(("key", digest), key)
        return key


def _incorrect(token: str) -> AuthenticationError:
    shown = f"{token[:8]}...{token[-4:]}" if len(token) > 12 else "***"
    return AuthenticationError(f"Incorrect API key provided: {shown}.")
