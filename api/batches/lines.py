"""A batch input file's lines, validated in the parsing processes (api.parsing), to which
api.batches sends them a run at a time.

What needs the whole file, line numbers and repeated custom_ids, is left to the caller.
"""

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.errors import describe
from core import capabilities, output_limits
from core.errors import FerryError
from core.settings import ApiSettings
from core.validation import check_json_text, check_request, check_storable, unstorable
from core.wire.requests import ChatCompletionRequest

ENDPOINT = "/v1/chat/completions"
# The longest custom_id the tables hold (jobs.custom_id, batch_line_errors.custom_id).
MAX_CUSTOM_ID = 512


class LineError(Exception):
    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }


@dataclass(frozen=True)
class Served:
    """What a served model takes, as the lines are checked against it."""

    capabilities: list[str]
    max_model_len: int | None


@dataclass
class Line:
    """One line, validated: a job to create, or why not.

    `custom_id` is set once the line's custom_id passed its own checks (whether another line
    has it too is the caller's to say); `error` is None for a valid line, whose `job` then holds
    the job's model, its request as JSON text, `store` and `metadata`.
    """

    custom_id: str | None
    error: dict[str, Any] | None = None
    # For an error row when the line has no valid custom_id: whatever storable one it has.
    error_custom_id: str | None = None
    job: dict[str, Any] | None = None


def read_lines(
    raws: list[bytes], models: dict[str, Served], settings: ApiSettings
) -> list[Line | None]:
    """Each of `raws` validated against the served `models` (name: what it serves); None for a
    blank line, which is not a request."""
    return [_read(raw, models, settings) if raw.strip() else None for raw in raws]


def _read(raw: bytes, models: dict[str, Served], settings: ApiSettings) -> Line:
    try:
        line = _head(raw, settings)
    except LineError as exc:
        return Line(None, exc.as_dict(), _custom_id_of(raw))
    custom_id = line["custom_id"]
    try:
        body = _body(line, models, settings)
    except LineError as exc:
        return Line(custom_id, exc.as_dict())
    job = {
        "model": body.model,
        "request": json.dumps(body.model_dump(mode="json", exclude_unset=True)),
        "store": bool(body.store),
        "metadata": body.metadata,
    }
    return Line(custom_id, job=job)


def _not_json(constant: str) -> Any:
    """Python's parser takes NaN and Infinity; JSON (and Postgres' jsonb) does not."""
    raise ValueError(f"{constant} is not a JSON value")


def _head(raw: bytes, settings: ApiSettings) -> dict[str, Any]:
    """The line as a JSON object with a custom_id that can be stored; LineError if it is not."""
    limit = settings.max_batch_line_bytes
    if len(raw) > limit:
        raise LineError(
            f"The line is longer than {limit} bytes, the most a batch line may hold.",
            "line_too_long",
        )
    try:
        check_json_text(raw, settings.max_json_depth)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_json") from None
    try:
        line = json.loads(raw, parse_constant=_not_json)
    except ValueError as exc:
        raise LineError(f"The line is not valid JSON: {exc}.", "invalid_json") from exc
    if not isinstance(line, dict):
        raise LineError("The line is not a JSON object.", "invalid_json")
    try:
        check_storable(line)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_value", exc.param) from None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("The line has no 'custom_id'.", "missing_required_parameter", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise LineError(
            f"Invalid 'custom_id': string too long. Expected a string with maximum length "
            f"{MAX_CUSTOM_ID}, but got a string with length {len(custom_id)} instead.",
            "string_above_max_length",
            "custom_id",
        )
    return line


def _body(
    line: dict[str, Any], models: dict[str, Served], settings: ApiSettings
) -> ChatCompletionRequest:
    """The line's request, valid for a served model; LineError if it is not."""
    if line.get("method") != "POST":
        raise LineError("The line's 'method' must be 'POST'.", "invalid_method", "method")
    if line.get("url") != ENDPOINT:
        raise LineError(f"The line's 'url' must be '{ENDPOINT}'.", "invalid_url", "url")
    try:
        body = ChatCompletionRequest.model_validate(line.get("body"))
    except ValidationError as exc:
        message, param, code = describe(dict(exc.errors()[0]))
        raise LineError(
            message, code or "invalid_request", f"body.{param}" if param else "body"
        ) from exc
    if body.stream:
        raise LineError("Batch requests cannot be streamed.", "invalid_value", "body.stream")
    try:
        check_request(body, settings)
    except FerryError as exc:
        raise LineError(exc.message, exc.code or "invalid_request", f"body.{exc.param}") from exc
    served = models.get(body.model)
    if served is None:
        raise LineError(
            f"The model '{body.model}' does not exist: no worker has ever served it.",
            "model_not_found",
            "body.model",
            404,
        )
    try:
        capabilities.check(body, served.capabilities)
        output_limits.check(body, served.max_model_len, settings)
    except FerryError as exc:
        raise LineError(
            exc.message, exc.code or "unsupported_parameter", f"body.{exc.param}"
        ) from exc
    return body


def _custom_id_of(raw: bytes) -> str | None:
    """The custom_id of a line that failed, if it has one that can be stored."""
    try:
        value = json.loads(raw.decode("utf-8", "replace")).get("custom_id")
    except Exception:
        return None
    if not isinstance(value, str) or len(value) > MAX_CUSTOM_ID:
        return None
    return value if unstorable(value) is None else None
