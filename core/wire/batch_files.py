"""The lines of a batch's files, as OpenAI's Batch API reads and writes them (and vLLM's
`run_batch`: `BatchRequestInput`, `BatchRequestOutput`).

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`BatchRequestInput`,
`BatchRequestOutput`).
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

from core.wire.requests import ChatCompletionRequest

# The longest custom_id the tables hold (jobs.custom_id, batch_line_errors.custom_id).
MAX_CUSTOM_ID = 512


class BatchRequestInput(BaseModel):
    """One line of a batch input file (`BatchRequestInput`); its other fields are ignored."""

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: ChatCompletionRequest


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
