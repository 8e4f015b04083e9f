"""The checks on a chat completion request that are not its shape: what this deployment takes
(its limits on messages, the content parts and tools its engine reads, its service tiers), text
that Postgres can store, and JSON text before it is parsed.

The shape, and the rules across fields, are the types' (`core.wire.requests`), worded by
`core.wire.wording`. Each check here raises InvalidRequestError naming the field's path as
OpenAI writes it (`messages[2].content[0].type`) and OpenAI's code where it has one.
"""

import re
from array import array
from itertools import accumulate
from typing import Any

from pydantic import TypeAdapter, ValidationError

from core.errors import InvalidRequestError
from core.settings import ApiSettings, api_settings
from core.wire.messages import AssistantMessage, ChatMessage, parts, text_chars
from core.wire.requests import ChatCompletionRequest, Metadata
from core.wire.wording import refused

ACCEPTED_SERVICE_TIERS = ("auto", "default")
# What the engine reads; other types are valid OpenAI input this deployment cannot use.
ENGINE_PART_TYPES = {"text", "refusal"}
ENGINE_TOOL_TYPES = {"function"}
_METADATA: TypeAdapter[dict[str, str]] = TypeAdapter(Metadata)


def _invalid(message: str, param: str, code: str | None = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def check_range(value: int, low: int, high: int, param: str) -> None:
    """An integer outside [low, high] is refused as OpenAI words it."""
    if low <= value <= high:
        return
    kind, ctx = (
        ("less_than_equal", {"le": high}) if value > high else ("greater_than_equal", {"ge": low})
    )
    raise refused([{"type": kind, "loc": (param,), "input": value, "ctx": ctx}])


def check_request(body: ChatCompletionRequest, settings: ApiSettings | None = None) -> None:
    """Raise InvalidRequestError for the first rule of the deployment `body` breaks.

    The limits on messages are `settings`' (the process's own by default).
    """
    _check_message_limits(body.messages, settings or api_settings())
    check_storable(body.model_dump(exclude_unset=True))
    _check_engine_reads(body)
    if body.service_tier is not None and body.service_tier not in ACCEPTED_SERVICE_TIERS:
        raise _invalid(
            f"Invalid value for 'service_tier': '{body.service_tier}' is not offered here; "
            "use 'auto' or 'default'.",
            "service_tier",
        )


def _check_message_limits(messages: list[ChatMessage], settings: ApiSettings) -> None:
    if len(messages) > settings.max_messages:
        raise _invalid(
            f"Invalid 'messages': array too long. Expected an array with maximum length "
            f"{settings.max_messages}, but got an array with length {len(messages)} instead.",
            "messages",
            "array_above_max_length",
        )
    chars = sum(map(text_chars, messages))
    if chars > settings.max_messages_chars:
        raise _invalid(
            f"Invalid 'messages': content too long. Expected at most "
            f"{settings.max_messages_chars} characters of content across all messages, but got "
            f"{chars} characters instead.",
            "messages",
            "string_above_max_length",
        )


def _unsupported(what: str, param: str) -> InvalidRequestError:
    return _invalid(f"The served model does not support {what}.", param, "unsupported_value")


def _check_engine_reads(body: ChatCompletionRequest) -> None:
    """Refuse the first content part, tool or tool call of a type the engine cannot read."""
    for i, message in enumerate(body.messages):
        for j, part in enumerate(parts(message)):
            if part.type not in ENGINE_PART_TYPES:
                where = f"messages[{i}].content[{j}].type"
                raise _unsupported(f"content parts of type '{part.type}'", where)
        calls = message.tool_calls or [] if isinstance(message, AssistantMessage) else []
        for j, call in enumerate(calls):
            if call.type not in ENGINE_TOOL_TYPES:
                where = f"messages[{i}].tool_calls[{j}].type"
                raise _unsupported(f"tool calls of type '{call.type}'", where)
    for i, tool in enumerate(body.tools or []):
        if tool.type not in ENGINE_TOOL_TYPES:
            raise _unsupported(f"tools of type '{tool.type}'", f"tools[{i}].type")
    kind = getattr(body.tool_choice, "type", "function")
    if kind not in ENGINE_TOOL_TYPES:
        raise _unsupported(f"a 'tool_choice' of type '{kind}'", "tool_choice.type")


def check_metadata(metadata: dict[str, str] | None) -> None:
    """Metadata as OpenAI limits it (16 pairs, keys of 64 characters, values of 512)."""
    if metadata is None:
        return
    check_storable(metadata, "metadata")
    try:
        _METADATA.validate_python(metadata)
    except ValidationError as exc:
        raise refused({**e, "loc": ("metadata", *e["loc"])} for e in exc.errors()) from None


# A JSON string, escapes included: brackets inside one do not nest anything.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Opening brackets as +1, closing ones as -1 (a signed byte).
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays and objects more than `limit` deep, found in linear time
    without parsing it (a parser's recursion is what deep nesting attacks)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    steps = array("b")
    steps.frombytes(_JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS).translate(_STEPS))
    return max(accumulate(steps), default=0) > limit


def check_json_text(raw: bytes, max_depth: int) -> None:
    """Raise InvalidRequestError unless `raw` is UTF-8 nesting at most `max_depth` levels deep;
    whether it parses is left to the JSON parser."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"The JSON text is not valid UTF-8: byte 0x{raw[exc.start]:02x} at position "
            f"{exc.start} ({exc.reason}).",
            code="invalid_encoding",
        ) from None
    if nested_deeper_than(raw, max_depth):
        raise InvalidRequestError(
            f"The JSON text nests arrays and objects more than {max_depth} levels deep.",
            code="nesting_too_deep",
        )


def unstorable(value: Any, path: str = "") -> str | None:
    """Where in `value` (keys included) the first string is that Postgres cannot store, one with
    a NUL character or an unpaired UTF-16 surrogate (JSON's escapes allow both); None if none."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                return where
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                inner = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and not _storable(key):
                    return inner
                children.append((inner, child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{where}[{i}]", child) for i, child in enumerate(item)]))
    return None


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_storable(value: Any, path: str = "") -> None:
    """Raise InvalidRequestError naming the first string in `value` that cannot be stored."""
    where = unstorable(value, path)
    if where is not None:
        # The path may hold the very surrogate: escaped, so that the error itself can be sent.
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")
        raise _invalid(
            f"Invalid '{where}': the text holds a NUL character or an unpaired UTF-16 surrogate, "
            "which cannot be stored.",
            where,
        )
