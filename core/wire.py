"""OpenAI's chat completion wire types, owned by Ferry.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`CreateChatCompletionRequest`,
`CreateChatCompletionResponse`, `ErrorResponse`). Fields are in the spec's order.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from core import request_schemas as schemas
from core.tables import BatchStatus

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Strict):
    """One message of the conversation (`ChatCompletionRequestMessage`)."""

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class ChatCompletionRequest(_Strict):
    """`CreateChatCompletionRequest`: what `POST /v1/chat/completions` accepts."""

    # ModelResponseProperties
    metadata: Annotated[dict[str, str], WithJsonSchema(schemas.METADATA)] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # CreateChatCompletionRequest
    messages: Annotated[
        list[Annotated[ChatMessage, WithJsonSchema(schemas.MESSAGE)]], Field(min_length=1)
    ]
    model: str = Field(min_length=1)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    web_search_options: dict[str, Any] | None = None
    response_format: Annotated[dict[str, Any], WithJsonSchema(schemas.RESPONSE_FORMAT)] | None = (
        None
    )
    audio: dict[str, Any] | None = None
    store: bool | None = None
    moderation: dict[str, Any] | None = None
    stream: bool | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4)] | None = None
    logit_bias: Annotated[dict[str, int], WithJsonSchema(schemas.LOGIT_BIAS)] | None = None
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    prediction: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream_options: Annotated[dict[str, Any], WithJsonSchema(schemas.STREAM_OPTIONS)] | None = None
    tools: Annotated[list[dict[str, Any]], WithJsonSchema(schemas.TOOLS)] | None = None
    tool_choice: Annotated[str | dict[str, Any], WithJsonSchema(schemas.TOOL_CHOICE)] | None = None
    parallel_tool_calls: bool | None = None
    function_call: (
        Annotated[str | dict[str, Any], WithJsonSchema(schemas.FUNCTION_CHOICE)] | None
    ) = None
    functions: (
        Annotated[
            list[dict[str, Any]],
            Field(min_length=1, max_length=128),
            WithJsonSchema(schemas.FUNCTIONS),
        ]
        | None
    ) = None


# Engines send null where OpenAI's schema has an empty list or object.
def _empty_list_if_none(value: Any) -> Any:
    return [] if value is None else value


def _empty_object_if_none(value: Any) -> Any:
    return {} if value is None else value


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(_Lenient):
    """`ChatCompletionResponseMessage`."""

    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    annotations: list[dict[str, Any]] = []
    role: Literal["assistant"] = "assistant"
    function_call: FunctionCall | None = None

    _no_null_annotations = field_validator("annotations", mode="before")(_empty_list_if_none)


class TokenLogprob(_Lenient):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobWithTop(TokenLogprob):
    top_logprobs: list[TokenLogprob] = []


class ChoiceLogprobs(_Lenient):
    content: list[TokenLogprobWithTop] | None = None
    refusal: list[TokenLogprobWithTop] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class Choice(_Lenient):
    finish_reason: FinishReason
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(_Lenient):
    audio_tokens: int = 0
    cached_tokens: int = 0


class CompletionTokensDetails(_Lenient):
    accepted_prediction_tokens: int = 0
    audio_tokens: int = 0
    reasoning_tokens: int = 0
    rejected_prediction_tokens: int = 0


class CompletionUsage(_Lenient):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    _no_null_details = field_validator(
        "completion_tokens_details", "prompt_tokens_details", mode="before"
    )(_empty_object_if_none)


class ChatCompletion(_Lenient):
    """`CreateChatCompletionResponse`."""

    id: str
    choices: list[Choice]
    created: int
    model: str
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    system_fingerprint: str | None = None
    object: Literal["chat.completion"] = "chat.completion"
    usage: CompletionUsage | None = None


class FunctionCallDelta(_Lenient):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Lenient):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChunkDelta(_Lenient):
    """`ChatCompletionStreamResponseDelta`."""

    content: str | None = None
    function_call: FunctionCallDelta | None = None
    tool_calls: list[ToolCallDelta] | None = None
    role: Literal["developer", "system", "user", "assistant", "tool"] | None = None
    refusal: str | None = None


class ChunkChoice(_Lenient):
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    index: int


class ChatCompletionChunk(_Lenient):
    """`CreateChatCompletionStreamResponse`."""

    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    service_tier: str | None = None
    system_fingerprint: str | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: CompletionUsage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """`ErrorResponse`: every error Ferry answers with."""

    error: ErrorBody


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
