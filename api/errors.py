"""Every error leaves the API in OpenAI's envelope, with OpenAI's status and code."""

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from core.errors import FerryError, error_envelope
from core.wire.responses import ErrorResponse
from core.wire.wording import refused

log = logging.getLogger(__name__)

# For routes' `responses=`: the statuses any Ferry route may answer with.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Invalid request",
        401: "Missing or invalid API key",
        404: "Not found",
        503: "A dependency or worker is unavailable",
    }.items()
}
# For routes that count requests against their project's limits.
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorResponse, "description": "A limit of the key's project is reached"}
}


class _ErrorJSONResponse(JSONResponse):
    """JSON in ASCII: a message that quotes the request may quote an unpaired surrogate, which
    has no UTF-8 form but has a JSON escape."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    return _ErrorJSONResponse(body, status_code=status, headers=headers)


async def _ferry_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FerryError)
    return _response(exc.status_code, exc.envelope(), exc.headers or None)


def _body_type(request: Request) -> Any:
    """The type the route validates its body as, so that paths into it are worded exactly."""
    body = getattr(request.scope.get("route"), "body_field", None)
    return body.field_info.annotation if body is not None else None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI's locations start with where the value was: the body's path, or a query
    # parameter's name, is OpenAI's param.
    errors = [
        {**e, "loc": e["loc"][1:]} if e["loc"][:1] in (("body",), ("query",)) else e
        for e in exc.errors()
    ]
    error = refused(errors, _body_type(request))
    return _response(error.status_code, error.envelope())


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = "Unknown request URL. Please check the URL and method."
        return _response(404, error_envelope(message, kind, None, "unknown_url"))
    return _response(exc.status_code, error_envelope(message, kind), getattr(exc, "headers", None))


async def _database_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return _response(
        503,
        error_envelope(
            "The database is unavailable; try again shortly.",
            "server_error",
            None,
            "service_unavailable",
        ),
        {"Retry-After": "2"},
    )


async def _unstorable_value(_: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (a NUL character, an unpaired surrogate, a number out of
    range) is the request's fault: 400, and the transaction holding it was rolled back. The
    database's own words stay in the log: they describe the schema, not the request."""
    detail = exc.orig if isinstance(exc, DataError) and exc.orig is not None else exc
    log.warning("a request's value could not be stored: %s", detail)
    return _response(
        400,
        error_envelope(
            "The request holds a value that cannot be stored.",
            "invalid_request_error",
            None,
            "invalid_value",
        ),
    )


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _response(
        500, error_envelope("The server had an error processing your request.", "server_error")
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FerryError, _ferry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(UnicodeEncodeError, _unstorable_value)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def send_error(send: Send, error: FerryError, *headers: tuple[bytes, bytes]) -> None:
    """Answer with `error` in OpenAI's envelope from pure ASGI code (middleware), with `headers`."""
    body = json.dumps(error.envelope()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
