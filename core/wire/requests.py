"""OpenAI's chat completion request, owned by Ferry: what `POST /v1/chat/completions` accepts.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`CreateChatCompletionRequest`).
Fields are in the spec's order.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from core import request_schemas as schemas

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
