"""OpenAI's resource objects Ferry serves besides the completion itself: models, stored
completions and their messages, files and batches, and their lists; each built from its row here.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml`. Fields are in the spec's order.
A field the spec has optional but not nullable is left out when None (`Sparse.ABSENT`).
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, Literal, Protocol, Self, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from core.tables import Batch, BatchStatus, Job, JobStatus, StoredFile
from core.wire.requests import Role
from core.wire.responses import ChatCompletion, ErrorBody, Sparse


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


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item")
_Listed = TypeVar("_Listed", bound=_Identified)


class CursorPage(BaseModel, Generic[Item]):
    """OpenAI's list object of a cursor-paged list: a page of items, and whether more follow."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str
    last_id: str
    has_more: bool

    @classmethod
    def of(cls, items: Sequence[_Listed], limit: int) -> Self:
        """The first `limit` of `items` (one more tells that more follow)."""
        data: list[Any] = list(items[:limit])
        return cls(
            data=data,
            first_id=data[0].id if data else "",
            last_id=data[-1].id if data else "",
            has_more=len(items) > limit,
        )


JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class StoredChatCompletion(ChatCompletion):
    """A stored completion: `ChatCompletion` with its `status` (no choices until it succeeds) and
    OpenAI's error object once it has failed."""

    ABSENT = ChatCompletion.ABSENT | {"error"}

    status: JobStatusName
    error: ErrorBody | None = None

    @classmethod
    def of(cls, job: Job) -> Self:
        """A job as its completion once it succeeded; before, or if not, without choices."""
        if job.status == JobStatus.succeeded and job.response is not None:
            return cls.model_validate({**job.response, "status": job.status.value})
        return cls(
            id=job.id,
            created=job.created,
            model=job.model,
            choices=[],
            metadata=job.metadata_,
            status=job.status.value,
            error=job.error["error"] if job.error is not None else None,
        )


class ChatCompletionList(CursorPage[StoredChatCompletion]):
    """`ChatCompletionList`."""


class ChatCompletionDeleted(BaseModel):
    """`ChatCompletionDeleted`."""

    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    id: str
    deleted: bool


class StoredMessage(Sparse):
    """One message of a stored completion's request (`ChatCompletionMessageList`'s items)."""

    ABSENT = frozenset({"tool_calls", "tool_call_id", "function_call"})

    id: str
    role: Role
    content: str | None
    refusal: str | None = None
    name: str | None = None
    content_parts: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None

    @classmethod
    def of(cls, job_id: str, index: int, message: dict[str, Any]) -> Self:
        """The `index`th message of a job's request; content parts also joined as its text."""
        content = message.get("content")
        parts = content if isinstance(content, list) else None
        if parts is not None:
            content = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
        return cls(
            id=f"{job_id}-{index}",
            role=message["role"],
            content=content,
            name=message.get("name"),
            content_parts=parts,
            tool_calls=message.get("tool_calls") or None,
            tool_call_id=message.get("tool_call_id") or None,
            function_call=message.get("function_call") or None,
        )


class ChatCompletionMessageList(CursorPage[StoredMessage]):
    """`ChatCompletionMessageList`."""


FilePurpose = Literal["batch", "batch_output"]


class ExpiresAfter(BaseModel):
    """`FileExpirationAfter` (a file upload's `expires_after`) and `BatchFileExpirationAfter` (a
    batch's `output_expires_after`): the file expires `seconds` after it was created."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)


class FileObject(Sparse):
    """`OpenAIFile`."""

    ABSENT = frozenset({"expires_at"})

    id: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    object: Literal["file"] = "file"
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"]

    @classmethod
    def of(cls, file: StoredFile) -> Self:
        """A stored file: processed once stored, as there is nothing more to do with it."""
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=int(file.created_at.timestamp()),
            expires_at=_unix(file.expires_at),
            filename=file.filename,
            purpose=cast(FilePurpose, file.purpose),
            status="processed",
        )


class FileList(CursorPage[FileObject]):
    """`ListFilesResponse`."""


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


def _unix(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


class BatchObject(Sparse):
    """`Batch`."""

    # Every field but `metadata`, which is null when not set.
    ABSENT = frozenset(
        {
            "model",
            "errors",
            "output_file_id",
            "error_file_id",
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        }
    )

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

    @classmethod
    def of(cls, batch: Batch) -> Self:
        """A batch from its row alone: its jobs are counted there as they end."""
        prompt, completion = batch.prompt_tokens, batch.completion_tokens
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            errors=None if batch.errors is None else BatchErrors.model_validate(batch.errors),
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=int(batch.created_at.timestamp()),
            in_progress_at=_unix(batch.in_progress_at),
            expires_at=_unix(batch.expires_at),
            finalizing_at=_unix(batch.finalizing_at),
            completed_at=_unix(batch.completed_at),
            failed_at=_unix(batch.failed_at),
            expired_at=_unix(batch.expired_at),
            cancelling_at=_unix(batch.cancelling_at),
            cancelled_at=_unix(batch.cancelled_at),
            request_counts=BatchRequestCounts(
                total=batch.total,
                completed=batch.completed,
                failed=batch.failed + batch.invalid,
            ),
            usage=BatchUsage(
                input_tokens=prompt,
                input_tokens_details=InputTokensDetails(cached_tokens=0),
                output_tokens=completion,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                total_tokens=prompt + completion,
            ),
            metadata=batch.metadata_,
        )


class BatchList(CursorPage[BatchObject]):
    """`ListBatchesResponse`."""


# Ferry's own resources (OpenAI shows limits only in headers and its dashboard).


class RateWindow(BaseModel):
    """A per-minute limit now: what is left, and when it is whole again (`6m0s`, `20ms`)."""

    limit: int
    remaining: int
    reset: str


class BatchQueueTokens(BaseModel):
    """The tokens the project's batches in progress hold on a model, and what is left."""

    limit: int | None
    in_use: int
    free: int | None


class ModelLimits(BaseModel):
    """A project's limits on one model (None: no limit), and what they leave now."""

    model: str
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    batch_queue_tokens: int | None
    requests: RateWindow | None
    tokens: RateWindow | None
    # Interactive requests queued or running now (counted only under a limit).
    concurrent: int | None
    batch_queue: BatchQueueTokens


class ProjectLimits(BaseModel):
    """`GET /v1/projects/me/limits`: the key's project's limits on each model, and what is free."""

    object: Literal["project.limits"] = "project.limits"
    project: str
    data: list[ModelLimits]
