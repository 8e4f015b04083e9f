"""OpenAI's chat completion answers, owned by Ferry: the completion, its stream's chunks, and the
error envelope.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`CreateChatCompletionResponse`,
`CreateChatCompletionStreamResponse`, `ErrorResponse`). Fields are in the spec's order.
"""

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sparse(BaseModel):
    """A shape whose fields named in `ABSENT` are left out when None: the spec has them optional
    but not nullable (a value when set, no key when not). Every other field is sent, null or not.
    """

    ABSENT: ClassVar[frozenset[str]] = frozenset()

    # No return annotation: pydantic would take it for the serialized shape in the schema.
    @model_serializer(mode="wrap")
    def _absent_when_none(self, handler: SerializerFunctionWrapHandler):
        body = handler(self)
        for name in self.ABSENT & body.keys():
            if body[name] is None:
                del body[name]
        return body


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


class ResponseMessage(_Lenient, Sparse):
    """`ChatCompletionResponseMessage`."""

    ABSENT = frozenset({"tool_calls", "function_call"})

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


class ChatCompletion(_Lenient, Sparse):
    """`CreateChatCompletionResponse`."""

    ABSENT = frozenset({"metadata", "service_tier", "system_fingerprint", "usage"})

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
