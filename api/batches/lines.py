"""A batch input file's lines, validated in the parsing processes (api.parsing), to which
api.batches sends them a run at a time.

What needs the whole file, line numbers and repeated custom_ids, is left to the caller.
"""

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from core import capabilities, output_limits, project_limits
from core.errors import FerryError, LineError
from core.settings import ApiSettings
from core.validation import check_json_text, check_request, check_storable, unstorable
from core.wire.batch_files import MAX_CUSTOM_ID, BatchRequestInput
from core.wire.requests import ChatCompletionRequest
from core.wire.wording import refused

ENDPOINT = "/v1/chat/completions"
# The line's own fields, checked before its body, and how each is refused.
_ENVELOPE = (
    ("custom_id", "The line has no 'custom_id'.", "missing_required_parameter"),
    ("method", "The line's 'method' must be 'POST'.", "invalid_method"),
    ("url", f"The line's 'url' must be '{ENDPOINT}'.", "invalid_url"),
)


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
    the job's model, its request as JSON text, `store`, `metadata` and its estimated `tokens`.
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
        parsed = _parsed(raw, settings)
    except LineError as exc:
        return Line(None, exc.as_dict(), _custom_id_of(raw))
    try:
        line = BatchRequestInput.model_validate(parsed)
    except ValidationError as exc:
        error = _line_error(exc.errors())
        if error.param == "custom_id":
            return Line(None, error.as_dict(), _custom_id_of(raw))
        return Line(parsed["custom_id"], error.as_dict())
    try:
        body = _served(line.body, models, settings)
    except LineError as exc:
        return Line(line.custom_id, exc.as_dict())
    job = {
        "model": body.model,
        "request": json.dumps(body.model_dump(mode="json", exclude_unset=True)),
        "store": bool(body.store),
        "metadata": body.metadata,
        # What it is estimated to cost, held against its project's batch queue limit.
        "tokens": project_limits.estimate_tokens(body, models[body.model].max_model_len),
    }
    return Line(line.custom_id, job=job)


def _not_json(constant: str) -> Any:
    """Python's parser takes NaN and Infinity; JSON (and Postgres' jsonb) does not."""
    raise ValueError(f"{constant} is not a JSON value")


def _parsed(raw: bytes, settings: ApiSettings) -> dict[str, Any]:
    """The line as a JSON object that can be stored; LineError if it is not."""
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
    return line


def _line_error(errors: list[ErrorDetails]) -> LineError:
    """Why a line is not a `BatchRequestInput`: its own fields first, in order, then its body."""
    for field, message, code in _ENVELOPE:
        mine = [error for error in errors if error["loc"][:1] == (field,)]
        if mine and mine[0]["type"] == "string_too_long":
            message, code = refused(mine).message, "string_above_max_length"
        if mine:
            return LineError(message, code, field)
    error = refused(errors, BatchRequestInput)
    return LineError(error.message, error.code or "invalid_request", error.param or "body")


def _served(
    body: ChatCompletionRequest, models: dict[str, Served], settings: ApiSettings
) -> ChatCompletionRequest:
    """`body`, if a served model can run it in a batch; LineError if not."""
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
