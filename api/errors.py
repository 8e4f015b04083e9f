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

# Pydantic's names for union members, which are not part of a field's path.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}

_JSON_HINT = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


def param_path(loc: tuple[Any, ...]) -> str | None:
    """`('body', 'messages', 2, 'role')` as OpenAI writes it: `messages[2].role`."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part.lower() in _TYPE_TAGS:
            continue
        else:
            path += f".{part}" if path else part
    return path or None


# Pydantic's bound errors: OpenAI's words, the bound's key in the error's context, sign, code.
_BOUNDS = {
    "less_than_equal": ("above maximum", "le", "<=", "above_max_value"),
    "less_than": ("above maximum", "lt", "<", "above_max_value"),
    "greater_than_equal": ("below minimum", "ge", ">=", "below_min_value"),
    "greater_than": ("below minimum", "gt", ">", "below_min_value"),
}


def _number_kind(limit: Any) -> str:
    return "integer" if isinstance(limit, int) and not isinstance(limit, bool) else "decimal"


def describe(error: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """One pydantic error as OpenAI's (message, param, code)."""
    kind = error["type"]
    param = param_path(tuple(error["loc"]))
    value = error.get("input")
    ctx = error.get("ctx") or {}
    where = f"'{param}'" if param else "request body"
    if kind == "json_invalid":
        return _JSON_HINT, None, None
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind in _BOUNDS:
        words, key, sign, suffix = _BOUNDS[kind]
        limit = ctx.get(key)
        number = _number_kind(limit)
        return (
            f"Invalid {where}: {number} {words} value. "
            f"Expected a value {sign} {limit:g}, but got {value} instead.",
            param,
            f"{number}_{suffix}",
        )
    if kind == "too_short":
        if ctx.get("min_length") == 1 and not value:
            return (
                f"Invalid {where}: empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                param,
                "empty_array",
            )
        return (
            f"Invalid {where}: array too short. Expected an array with minimum length "
            f"{ctx.get('min_length')}, but got an array with length {len(value or [])} instead.",
            param,
            "array_below_min_length",
        )
    if kind == "too_long":
        return (
            f"Invalid {where}: array too long. Expected an array with maximum length "
            f"{ctx.get('max_length')}, but got an array with length {len(value or [])} instead.",
            param,
            "array_above_max_length",
        )
    if kind == "string_too_long":
        return (
            f"Invalid {where}: string too long. Expected a string with maximum length "
            f"{ctx.get('max_length')}, but got a string with length {len(value or '')} instead.",
            param,
            "string_above_max_length",
        )
    if kind == "string_too_short":
        return f"Invalid {where}: string too short. {error['msg']}.", param, "string_too_short"
    if kind in ("literal_error", "enum"):
        return (
            f"Invalid value for {where}: {value!r}. {error['msg']}.",
            param,
            "invalid_value",
        )
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None, "invalid_type"
    return f"Invalid type for {where}: {error['msg'].lower()}.", param, "invalid_type"


class _ErrorJSONResponse(JSONResponse):
    """JSON in ASCII: a message that quotes the request may quote an unpaired surrogate, which
    has no UTF-8 form but has a JSON escape."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    return _ErrorJSONResponse(body, status_code=status, headers=headers)


async def _ferry_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FerryError)
    return _response(exc.status_code, exc.envelope())


def _specificity(error: dict[str, Any]) -> tuple[int, bool]:
    """Each member of a union reports; the one that names the deepest field and is not a mere
    type mismatch (e.g. `stop` too long as a list, rather than "not a string") says most."""
    return len(param_path(tuple(error["loc"])) or ""), not error["type"].endswith("_type")


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = max(errors, key=_specificity) if errors else None
    if first is None:
        return _response(400, error_envelope("Invalid request.", "invalid_request_error"))
    message, param, code = describe(first)
    return _response(400, error_envelope(message, "invalid_request_error", param, code))


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
