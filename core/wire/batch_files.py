"""The lines of a batch's output and error files, as OpenAI's Batch API writes them (and vLLM's
`run_batch`: `BatchRequestOutput`).

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`BatchRequestOutput`).
"""

from typing import Any

from pydantic import BaseModel


class BatchResponse(BaseModel):
    """The answer a line got: its status, the job's id, and the completion or error body."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchLineError(BaseModel):
    """Why a line has no answer: it never ran (cancelled, expired) or could not (invalid)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchRequestOutput(BaseModel):
    """One line of the output or the error file: `response` or `error`, the other null."""

    id: str
    custom_id: str | None
    response: BatchResponse | None
    error: BatchLineError | None

    def line(self) -> bytes:
        """The JSONL line; an error's `param` and `line` only where the batch knows them."""
        return self.model_dump_json(exclude_unset=True).encode() + b"\n"
