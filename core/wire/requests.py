"""OpenAI's chat completion request, owned by Ferry: what `POST /v1/chat/completions` accepts.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`CreateChatCompletionRequest`);
its messages are in `core.wire.messages`. Fields are in the spec's order. The types are the
shape, for validation and the OpenAPI document alike; the model validators are the rules
across fields. What depends on the deployment (its limits, what the engine takes) is
`core.validation`'s.
"""

from typing import Annotated, Any, Literal, cast

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from core.wire.messages import (
    OMITTED,
    AssistantMessage,
    ChatMessage,
    Role,
    Strict,
    TextContent,
    ToolMessage,
)

__all__ = ["ChatCompletionRequest", "ChatMessage", "Role"]


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# Keys are token ids, which JSON writes as strings.
LogitBias = Annotated[
    dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=-100, le=100)]],
    Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16),
]


def refusal(message: str, param: str, code: str = "invalid_value") -> PydanticCustomError:
    """A rule across fields, broken: `param` is the path from the model that checks it."""
    return PydanticCustomError(code, message, {"param": param})


class FunctionDefinition(Strict):
    """`FunctionObject`, also the deprecated `functions[]` (`ChatCompletionFunctions`)."""

    description: str = OMITTED
    name: FunctionName
    parameters: dict[str, Any] = OMITTED
    strict: bool | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class TextFormat(Strict):
    type: Literal["text"]


class Grammar(Strict):
    definition: str
    syntax: Literal["lark", "regex"]


class GrammarFormat(Strict):
    type: Literal["grammar"]
    grammar: Grammar


class CustomDefinition(Strict):
    name: str
    description: str = OMITTED
    format: Annotated[TextFormat | GrammarFormat, Field(discriminator="type")] = OMITTED


class CustomTool(Strict):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class ToolName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ToolName


class NamedCustomToolChoice(Strict):
    type: Literal["custom"]
    custom: ToolName


NamedChoice = Annotated[
    AllowedToolsChoice | NamedToolChoice | NamedCustomToolChoice, Field(discriminator="type")
]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    model_config = ConfigDict(serialize_by_alias=True)

    description: str = OMITTED
    name: FunctionName
    schema_: dict[str, Any] = Field(default=cast(Any, None), alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class VoiceId(Strict):
    id: str


class AudioOutput(Strict):
    voice: str | VoiceId
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class Prediction(Strict):
    type: Literal["content"]
    content: TextContent


class StreamOptions(Strict):
    include_usage: bool = OMITTED
    include_obfuscation: bool = OMITTED


class ChatCompletionRequest(Strict):
    """`CreateChatCompletionRequest`: what `POST /v1/chat/completions` accepts."""

    # ModelResponseProperties
    metadata: Metadata | None = None
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
    response_format: ResponseFormat | None = None
    audio: AudioOutput | None = None
    store: bool | None = None
    moderation: dict[str, Any] | None = None
    stream: bool | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4)] | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    prediction: Prediction | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    function_call: Literal["none", "auto"] | ToolName | None = None
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None = (
        None
    )

    @model_validator(mode="after")
    def _rules_across_fields(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise refusal(
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                "'top_logprobs' is used.",
                "top_logprobs",
            )
        if self.stream_options is not None and not self.stream:
            raise refusal(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if self.tools is not None and self.functions is not None:
            raise refusal("Use 'tools' or the deprecated 'functions', not both.", "functions")
        _check_answers(self.messages)
        _check_choice(self.tool_choice, self.tools or [], "tool_choice", "tools")
        _check_choice(self.function_call, self.functions or [], "function_call", "functions")
        return self


def _check_answers(messages: list[ChatMessage]) -> None:
    """Each tool message answers a call of the assistant message just before its run."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if isinstance(message, AssistantMessage):
            open_calls = {call.id for call in message.tool_calls or []}
        elif not isinstance(message, ToolMessage):
            open_calls = set()
        elif message.tool_call_id not in open_calls:
            raise refusal(
                "Invalid parameter: messages with role 'tool' must be a response to a "
                "preceding message with 'tool_calls' holding their 'tool_call_id'.",
                f"messages[{i}].role",
            )


def _declared(tool: Any) -> tuple[str, str]:
    """(kind, name) of a tool or a deprecated function."""
    if isinstance(tool, FunctionDefinition):
        return "function", tool.name
    if isinstance(tool, FunctionTool):
        return "function", tool.function.name
    return "custom", tool.custom.name


def _check_choice(choice: Any, declared: list[Any], param: str, field: str) -> None:
    """A mode other than 'none' needs tools; a named tool must be declared."""
    if choice is None or choice == "none":
        return
    if not declared:
        mode = f"'{choice}'" if isinstance(choice, str) else "a named tool"
        raise refusal(f"Invalid value for '{param}': {mode} needs '{field}'.", param)
    if isinstance(choice, str | AllowedToolsChoice):
        return
    kind, name = (
        ("custom", choice.custom.name)
        if isinstance(choice, NamedCustomToolChoice)
        else ("function", getattr(choice, "function", choice).name)
    )
    if (kind, name) not in map(_declared, declared):
        raise refusal(
            f"Invalid value for '{param}': no {kind} named {name!r} is in '{field}'.", param
        )
