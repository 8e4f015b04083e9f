"""Between OpenAI's wire format and vLLM's: what the engine is asked, and what clients get back.

vLLM's chat layer speaks OpenAI's protocol with extras; Ferry asks it in a form the served model's
template understands and answers with OpenAI's fields only, under the job's id and model.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.wire.responses import ChatCompletion, ChatCompletionChunk

# Fields of OpenAI's request that Ferry handles itself and vLLM does not take.
FERRY_ONLY_FIELDS = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "prediction",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "moderation",
        "verbosity",
        "web_search_options",
        "modalities",
        "audio",
        "stream_options",
        "functions",
        "function_call",
    }
)
SERVICE_TIER = "default"
T = TypeVar("T", ChatCompletion, ChatCompletionChunk)


@dataclass
class Answering:
    """How a job's answer is labelled and shaped."""

    id: str
    model: str
    created: int
    system_fingerprint: str
    metadata: dict[str, str] | None = None
    # The request used the deprecated `functions`: answer with `function_call`.
    legacy_functions: bool = False
    # The client asked for the usage chunk at the end of a stream.
    include_usage: bool = False
    batch_id: str | None = None

    def label(self, result: T) -> T:
        """Put the job's id, model, creation time and fingerprint on a response or chunk."""
        result.id = self.id
        result.model = self.model
        result.created = self.created
        result.service_tier = SERVICE_TIER
        result.system_fingerprint = self.system_fingerprint
        return result

    @classmethod
    def for_request(cls, body: dict[str, Any], **labels: Any) -> "Answering":
        return cls(
            legacy_functions=body.get("functions") is not None,
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            **labels,
        )


def engine_fields(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The request as vLLM's chat layer should get it."""
    fields = {k: v for k, v in body.items() if k not in FERRY_ONLY_FIELDS}
    fields["messages"] = _engine_messages(body["messages"])
    if body.get("functions") is not None:
        fields["tools"] = [{"type": "function", "function": f} for f in body["functions"]]
        choice = body.get("function_call")
        if isinstance(choice, dict):
            fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif choice is not None:
            fields["tool_choice"] = choice
    fields["stream"] = stream
    if stream:
        # Usage is always collected, for accounting; the client sees it only if it asked.
        fields["stream_options"] = {"include_usage": True}
    return fields


def _engine_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Developer messages as system ones, and the deprecated function-call turns as tool turns."""
    out = []
    last_call: dict[str, str] = {}
    for i, original in enumerate(messages):
        message = copy.copy(original)
        role = message["role"]
        if role == "developer":
            message["role"] = "system"
        elif role == "assistant" and message.get("function_call"):
            call_id = f"call_fn_{i}"
            last_call[message["function_call"]["name"]] = call_id
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": message.pop("function_call")}
            ]
        elif role == "function":
            message["role"] = "tool"
            message["tool_call_id"] = last_call.get(message.get("name", ""), f"call_fn_{i}")
        out.append(message)
    return out


def _dump(model: ChatCompletion | ChatCompletionChunk) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


def completion(raw: dict[str, Any], answering: Answering) -> dict[str, Any]:
    """vLLM's response as OpenAI's `chat.completion`."""
    result = answering.label(ChatCompletion.model_validate(raw))
    result.metadata = answering.metadata
    for choice in result.choices:
        message = choice.message
        if not message.tool_calls:
            message.tool_calls = None
        elif answering.legacy_functions:
            message.function_call = message.tool_calls[0].function
            message.tool_calls = None
            choice.finish_reason = "function_call"
    body = _dump(result)
    for choice in body["choices"]:
        _required_nulls(choice)
        choice["message"].setdefault("content", None)
        choice["message"].setdefault("refusal", None)
    return body


def _required_nulls(choice: dict[str, Any]) -> None:
    """Put back the keys the spec requires even when null, which dumping left out."""
    choice.setdefault("logprobs", None)
    if choice["logprobs"] is not None:
        choice["logprobs"].setdefault("content", None)
        choice["logprobs"].setdefault("refusal", None)
        for token in choice["logprobs"]["content"] or []:
            token.setdefault("bytes", None)
            for top in token.get("top_logprobs", []):
                top.setdefault("bytes", None)


def chunk(raw: dict[str, Any], answering: Answering) -> dict[str, Any] | None:
    """vLLM's stream chunk as OpenAI's `chat.completion.chunk`; None if the client gets none."""
    result = ChatCompletionChunk.model_validate(raw)
    if not result.choices and result.usage is not None and not answering.include_usage:
        return None
    answering.label(result)
    for choice in result.choices:
        delta = choice.delta
        if answering.legacy_functions and delta.tool_calls:
            delta.function_call = delta.tool_calls[0].function
            delta.tool_calls = None
        if answering.legacy_functions and choice.finish_reason == "tool_calls":
            choice.finish_reason = "function_call"
    body = _dump(result)
    for choice in body["choices"]:
        _required_nulls(choice)
        choice.setdefault("finish_reason", None)
    if answering.include_usage:
        body.setdefault("usage", None)
    return body


@dataclass
class _ChoiceParts:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    function_call: dict[str, str] | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


class StreamAssembler:
    """Builds the whole completion from the chunks a client was streamed, for storage."""

    def __init__(self, answering: Answering) -> None:
        self.answering = answering
        self.choices: dict[int, _ChoiceParts] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, raw: dict[str, Any]) -> None:
        """Take one of vLLM's chunks (before shaping: it always carries usage at the end)."""
        if raw.get("usage"):
            self.usage = raw["usage"]
        for choice in raw.get("choices", []):
            parts = self.choices.setdefault(choice["index"], _ChoiceParts())
            delta = choice.get("delta") or {}
            if delta.get("content"):
                parts.content.append(delta["content"])
            if delta.get("refusal"):
                parts.refusal.append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                slot = parts.tool_calls.setdefault(
                    call["index"], {"id": None, "name": "", "arguments": ""}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            if (choice.get("logprobs") or {}).get("content"):
                parts.logprobs.extend(choice["logprobs"]["content"])
            if choice.get("finish_reason"):
                parts.finish_reason = choice["finish_reason"]

    def completion(self) -> dict[str, Any]:
        """The assembled `chat.completion`, shaped as the non-streamed answer would be."""
        choices = []
        for index in sorted(self.choices):
            parts = self.choices[index]
            calls = [
                {
                    "id": slot["id"],
                    "type": "function",
                    "function": {"name": slot["name"], "arguments": slot["arguments"]},
                }
                for _, slot in sorted(parts.tool_calls.items())
            ]
            choices.append(
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": "".join(parts.content) if parts.content or not calls else None,
                        "refusal": "".join(parts.refusal) or None,
                        "tool_calls": calls or None,
                    },
                    "logprobs": {"content": parts.logprobs} if parts.logprobs else None,
                    "finish_reason": parts.finish_reason or "stop",
                }
            )
        raw = {
            "id": self.answering.id,
            "created": self.answering.created,
            "model": self.answering.model,
            "choices": choices,
            "usage": self.usage,
        }
        return completion(raw, self.answering)


class ToolMarkupFilter:
    """Holds back streamed content that may open a tool call in the model's markup.

    A parser recognises a tool call only once its opening tag is complete, and the tag's first
    characters would otherwise reach the client as content. Held text is sent on as content if
    no tool call follows.
    """

    OPENERS = ("<tool_call>",)

    def __init__(self) -> None:
        self.held: dict[int, str] = {}
        self.calling: set[int] = set()

    def __call__(self, raw: dict[str, Any]) -> None:
        """Rewrite one of vLLM's chunks in place."""
        for choice in raw.get("choices", []):
            index, delta = choice["index"], choice.get("delta") or {}
            if delta.get("tool_calls"):
                self.calling.add(index)
                self.held.pop(index, None)
            content = delta.get("content")
            if content and index in self.calling:
                delta["content"] = None
            elif content:
                text = self.held.pop(index, "") + content
                if any(o.startswith(text) or text.startswith(o) for o in self.OPENERS):
                    self.held[index] = text
                    delta["content"] = None
                else:
                    delta["content"] = text
            if choice.get("finish_reason") and index in self.held:
                delta["content"] = self.held.pop(index) + (delta.get("content") or "")
            choice["delta"] = delta
