"""OpenAI's chat completion wire types, owned by Ferry.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`CreateChatCompletionRequest`,
`CreateChatCompletionResponse`, `ErrorResponse`). Fields are in the spec's order.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    metadata: dict[str, str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # CreateChatCompletionRequest
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str = Field(min_length=1)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    web_search_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    store: bool | None = None
    moderation: dict[str, Any] | None = None
    stream: bool | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4)] | None = None
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    prediction: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    function_call: str | dict[str, Any] | None = None
    functions: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=128)] | None = None


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
    role: Literal["assistant"] = "assistant"
    function_call: FunctionCall | None = None


class TokenLogprob(_Lenient):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobWithTop(TokenLogprob):
    top_logprobs: list[TokenLogprob] = []


class ChoiceLogprobs(_Lenient):
    content: list[TokenLogprobWithTop] | None = None
    refusal: list[TokenLogprobWithTop] | None = None


class Choice(_Lenient):
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None


class CompletionUsage(_Lenient):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0


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
