"""Limits on request bodies, enforced while the bytes arrive, before anything parses them.

A body over its limit is refused with 413 as soon as its Content-Length or its count of bytes
received says so; a JSON body that is not UTF-8 or nests too deep is refused with 400 before the
JSON parser sees it. The routes never run for such a request, so nothing is stored or queued.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import send_error
from api.middleware import HttpMiddleware
from core.errors import (
    FerryError,
    FileTooLargeError,
    InvalidRequestError,
    RequestTooLargeError,
)
from core.settings import ApiSettings
from core.validation import check_json_text

# Multipart framing and the form's other fields, on top of the file itself.
UPLOAD_FRAMING_BYTES = 1 << 20
UPLOAD_PATHS = ("/v1/files",)


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"The request body is larger than {_size(limit)}, the most this endpoint accepts."
    )


def file_too_large(limit: int) -> FileTooLargeError:
    """The error for an uploaded file over `limit` bytes."""
    return FileTooLargeError(
        f"The file is larger than {_size(limit)}, the most an upload may hold.", param="file"
    )


def _size(limit: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if limit >= 1 << shift and limit % (1 << shift) == 0:
            return f"{limit >> shift} {unit}"
    return f"{limit} bytes"


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while the app reads a streamed body; FastAPI lets it through."""

    def __init__(self, error: FerryError) -> None:
        super().__init__(error.status_code, error.message)
        self.error = error


async def _body_too_large(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, _BodyTooLarge)
    return JSONResponse(
        exc.error.envelope(), status_code=exc.error.status_code, headers={"connection": "close"}
    )


async def _refuse(send: Send, error: FerryError) -> None:
    # Past a 413 the rest of the body is not read: the connection cannot carry another request.
    close = [(b"connection", b"close")] if isinstance(error, RequestTooLargeError) else []
    await send_error(send, error, *close)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_json(scope: Scope) -> bool:
    """A body FastAPI would parse as JSON: no content type, or a JSON one."""
    kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return not kind or kind == "application/json" or kind.endswith("+json")


class BodyLimits(HttpMiddleware):
    """Pure ASGI middleware: body size, encoding and nesting limits.

    File uploads (multipart, up to `max_upload_bytes`) stream through, counted chunk by chunk;
    every other body (up to `max_request_bytes`) is gathered first, which FastAPI would do anyway,
    and checked before the app sees it.
    """

    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        super().__init__(app)
        self.settings = settings

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS
        error: RequestTooLargeError
        if upload:
            limit = self.settings.max_upload_bytes + UPLOAD_FRAMING_BYTES
            error = file_too_large(self.settings.max_upload_bytes)
        else:
            limit = self.settings.max_request_bytes
            error = _too_large(limit)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, error)
            return
        if upload:
            await self.app(scope, _counted(receive, limit, error), send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(send, error)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if raw and _is_json(scope):
            try:
                check_json_text(raw, self.settings.max_json_depth)
            except InvalidRequestError as exc:
                await _refuse(send, exc)
                return
        await self.app(scope, _replay(raw, receive), send)


def _counted(receive: Receive, limit: int, error: FerryError) -> Receive:
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(error)
        return message

    return counted


def _replay(raw: bytes, receive: Receive) -> Receive:
    """The gathered body as one message, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


def install_limits(app: FastAPI, settings: ApiSettings) -> None:
    """Add the body limits to `app`, inside whatever middleware is added after this."""
    app.add_middleware(BodyLimits, settings=settings)
    app.add_exception_handler(_BodyTooLarge, _body_too_large)
