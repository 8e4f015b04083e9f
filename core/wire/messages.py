"""The messages of a chat completion request: one model per role, their content parts and the
tool calls an assistant message carries.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml` (`ChatCompletionRequestMessage`
and the schemas it refers to). Fields are in the spec's order.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


# The default of an optional field that OpenAI does not let be null: absent, never null
# (the engine refuses a null where OpenAI's types have none).
OMITTED: Any = Field(default=None)


class Strict(BaseModel):
    """A request object: a field OpenAI does not define is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class PromptCacheBreakpoint(Strict):
    mode: Literal["explicit"]


class TextPart(Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint = OMITTED


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] = OMITTED


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl
    prompt_cache_breakpoint: PromptCacheBreakpoint = OMITTED


class InputAudio(Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio
    prompt_cache_breakpoint: PromptCacheBreakpoint = OMITTED


class FileData(Strict):
    filename: str = OMITTED
    file_data: str = OMITTED
    file_id: str = OMITTED


class FilePart(Strict):
    type: Literal["file"]
    file: FileData
    prompt_cache_breakpoint: PromptCacheBreakpoint = OMITTED


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
TextContent = str | Annotated[list[TextPart], Field(min_length=1)]


class CalledFunction(Strict):
    """The function an assistant message called (`tool_calls[].function`, `function_call`)."""

    name: str
    arguments: str


class FunctionToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class CustomCall(Strict):
    name: str
    input: str


class CustomToolCall(Strict):
    id: str
    type: Literal["custom"]
    custom: CustomCall


ToolCall = Annotated[FunctionToolCall | CustomToolCall, Field(discriminator="type")]


class SystemMessage(Strict):
    content: TextContent
    role: Literal["system"]
    name: str = OMITTED


class DeveloperMessage(Strict):
    content: TextContent
    role: Literal["developer"]
    name: str = OMITTED


class UserMessage(Strict):
    content: str | Annotated[list[UserPart], Field(min_length=1)]
    role: Literal["user"]
    name: str = OMITTED


class AssistantAudio(Strict):
    id: str


class AssistantMessage(Strict):
    content: str | Annotated[list[AssistantPart], Field(min_length=1)] | None = None
    refusal: str | None = None
    role: Literal["assistant"]
    name: str = OMITTED
    audio: AssistantAudio | None = None
    tool_calls: list[ToolCall] = OMITTED
    function_call: CalledFunction | None = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(Strict):
    role: Literal["function"]
    content: str | None
    name: str


ChatMessage = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]


def parts(message: ChatMessage) -> list[ContentPart]:
    """The message's content parts; none if its content is a string."""
    return list(message.content) if isinstance(message.content, list) else []


def text_chars(message: ChatMessage) -> int:
    """The characters a message gives the model: its text, refusal and tool call arguments."""
    texts = [message.content if isinstance(message.content, str) else ""]
    texts += [
        p.text if isinstance(p, TextPart) else getattr(p, "refusal", "") for p in parts(message)
    ]
    if isinstance(message, AssistantMessage):
        texts.append(message.refusal or "")
        for call in message.tool_calls or []:
            texts.append(
                call.function.arguments if isinstance(call, FunctionToolCall) else call.custom.input
            )
        texts.append(message.function_call.arguments if message.function_call else "")
    return sum(map(len, texts))
