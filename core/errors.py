"""One error family, rendered as OpenAI's envelope `{"error": {message, type, param, code}}`.

The same shape is stored on failed jobs, so a job's error reads as the HTTP error would; a batch
line's error is the same error, written to the batch's error file instead of answered.

The hierarchy (status and `code` as answered):

* FerryError (500 server_error)
  + InvalidRequestError (400)
  |  + LineError - one batch input line that cannot run; it fails alone
  + RequestTooLargeError (413 request_too_large)
  |  + FileTooLargeError (413 file_too_large)
  + AuthenticationError (401 invalid_api_key)
  |  + MissingApiKeyError (401)
  + NotFoundError (404)
  |  + ModelNotFoundError (404 model_not_found)
  + ConflictError (409 conflict)
  |  + CancelledError (409 cancelled) - the job was cancelled through the API
  + RateLimitError (429 rate_limit_exceeded) - a project's limit per minute or at once
  + ServiceUnavailableError (503 service_unavailable)
  |  + WorkerLostError (503 worker_lost) - its worker stopped and it could not run again
  + GatewayTimeoutError (504 timeout)
  + EngineError (500 engine_error) - the engine failed on a job
"""

from typing import Any


class FerryError(Exception):
    """An error with an HTTP status that renders as OpenAI's error envelope."""

    status_code = 500
    type = "server_error"
    code: str | None = None
    # Headers the answer carries besides the envelope (e.g. Retry-After).
    headers: dict[str, str] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type

    @classmethod
    def from_envelope(cls, envelope: dict[str, Any] | None, status_code: int) -> "FerryError":
        """The error an OpenAI error body (as stored on a failed job) stands for."""
        error = (envelope or {}).get("error") or {}
        return cls(
            error.get("message") or "The request failed.",
            status_code=status_code,
            type=error.get("type"),
            param=error.get("param"),
            code=error.get("code"),
        )

    def envelope(self) -> dict[str, Any]:
        """OpenAI's error body for this error."""
        return error_envelope(self.message, self.type, self.param, self.code)


def error_envelope(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InvalidRequestError(FerryError):
    status_code = 400
    type = "invalid_request_error"


class LineError(InvalidRequestError):
    """One batch input line that cannot run: it fails alone, in the batch's error file."""

    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400):
        super().__init__(message, param=param, code=code, status_code=status)

    def as_dict(self) -> dict[str, Any]:
        """The line's error as the batch stores it (its number is added by the batch)."""
        return {
            "status": self.status_code,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }


class RequestTooLargeError(FerryError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class FileTooLargeError(RequestTooLargeError):
    code = "file_too_large"


class AuthenticationError(FerryError):
    status_code = 401
    type = "invalid_request_error"
    code: str | None = "invalid_api_key"


class MissingApiKeyError(AuthenticationError):
    code = None


class NotFoundError(FerryError):
    status_code = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist: no worker has ever served it.", param="model"
        )


class RateLimitError(FerryError):
    """A project's limit is reached: `type` says which ("requests" or "tokens"), as OpenAI's."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, type: str, headers: dict[str, str]) -> None:
        super().__init__(message, type=type)
        self.headers = headers


class ServiceUnavailableError(FerryError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class WorkerLostError(ServiceUnavailableError):
    """The worker running the job stopped, and the job cannot run again."""

    code = "worker_lost"


class GatewayTimeoutError(FerryError):
    status_code = 504
    type = "server_error"
    code = "timeout"


class ConflictError(FerryError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class CancelledError(ConflictError):
    """The job was cancelled through the API."""

    status_code = 409
    type = "invalid_request_error"
    code = "cancelled"

    def __init__(self, message: str = "The request was cancelled.") -> None:
        super().__init__(message)


class EngineError(FerryError):
    """The engine failed on a job."""

    status_code = 500
    type = "server_error"
    code = "engine_error"
