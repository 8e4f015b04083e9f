"""OpenAI's resource objects Ferry serves besides the completion itself: models, stored
completions and their messages, files and batches, and their lists.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml`. Fields are in the spec's order.
"""

from typing import Any, Literal

from pydantic import BaseModel

from core.tables import BatchStatus
from core.wire.requests import Role
from core.wire.responses import ChatCompletion, ErrorBody


class Model(BaseModel):
    """`Model`: a model some live worker serves."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ferry"


class ModelList(BaseModel):
    """`ListModelsResponse`."""

    object: Literal["list"] = "list"
    data: list[Model]


# What the other routes answer with, for the OpenAPI document (the routes send dicts of these
# shapes; a schema check in the suite holds them to it). Extra fields are allowed, as in the spec.

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class StoredChatCompletion(ChatCompletion):
    """A stored completion: `ChatCompletion` with its `status` (no choices until it succeeds) and
    OpenAI's error object once it has failed."""

    status: JobStatusName
    error: ErrorBody | None = None


class ChatCompletionList(BaseModel):
    """`ChatCompletionList`."""

    object: Literal["list"] = "list"
    data: list[StoredChatCompletion]
    first_id: str
    last_id: str
    has_more: bool


class ChatCompletionDeleted(BaseModel):
    """`ChatCompletionDeleted`."""

    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    id: str
    deleted: bool


class StoredMessage(BaseModel):
    """One message of a stored completion's request (`ChatCompletionMessageList`'s items)."""

    id: str
    role: Role
    content: str | None
    refusal: str | None = None
    name: str | None = None
    content_parts: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None


class ChatCompletionMessageList(BaseModel):
    """`ChatCompletionMessageList`."""

    object: Literal["list"] = "list"
    data: list[StoredMessage]
    first_id: str
    last_id: str
    has_more: bool


class FileObject(BaseModel):
    """`OpenAIFile`."""

    id: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    object: Literal["file"] = "file"
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"]


class FileList(BaseModel):
    """`ListFilesResponse`."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str
    last_id: str
    has_more: bool


class FileDeleted(BaseModel):
    """`DeleteFileResponse`."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchError(BaseModel):
    """`BatchError`: why a line, or the whole batch, failed."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    """`BatchRequestCounts`."""

    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    """`Batch`."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts | None = None
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    """`ListBatchesResponse`."""

    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
