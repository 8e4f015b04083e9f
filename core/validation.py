"""The checks on a chat completion request that its types alone do not express.

Each raises InvalidRequestError naming the field's path as OpenAI writes it (`messages[2].role`,
`metadata.mykey`) and OpenAI's code where it has one.
"""

import re
from array import array
from itertools import accumulate
from typing import Any

from core.errors import InvalidRequestError
from core.settings import ApiSettings, api_settings
from core.wire.requests import ChatCompletionRequest, ChatMessage

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ACCEPTED_SERVICE_TIERS = ("auto", "default")

# Content part types each role may send.
PART_TYPES = {
    "system": {"text"},
    "developer": {"text"},
    "user": {"text", "image_url", "input_audio", "file"},
    "assistant": {"text", "refusal"},
    "tool": {"text"},
    "function": {"text"},
}
# Part types the engine can take; others are valid OpenAI input this deployment cannot use.
ENGINE_PART_TYPES = {"text", "refusal"}


def _invalid(message: str, param: str, code: str | None = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _json_type(value: Any) -> str:
    """What a parsed JSON value is, as OpenAI names it in its messages ("an object")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def check_range(value: int, low: int, high: int, param: str) -> None:
    """An integer outside [low, high] is refused as OpenAI words it."""
    if low <= value <= high:
        return
    word, sign, bound, code = (
        ("above maximum", "<=", high, "integer_above_max_value")
        if value > high
        else ("below minimum", ">=", low, "integer_below_min_value")
    )
    raise _invalid(
        f"Invalid '{param}': integer {word} value. Expected a value {sign} {bound}, but got "
        f"{value} instead.",
        param,
        code,
    )


def check_request(body: ChatCompletionRequest, settings: ApiSettings | None = None) -> None:
    """Raise InvalidRequestError for the first rule `body` breaks.

    The limits on messages are `settings`' (the process's own by default).
    """
    _check_message_limits(body.messages, settings or api_settings())
    check_storable(body.model_dump(exclude_unset=True))
    _check_messages(body.messages)
    check_metadata(body.metadata)
    _check_logit_bias(body.logit_bias)
    if body.top_logprobs is not None and not body.logprobs:
        raise _invalid(
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
            "'top_logprobs' is used.",
            "top_logprobs",
        )
    if body.stream_options is not None and not body.stream:
        raise _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    if body.service_tier is not None and body.service_tier not in ACCEPTED_SERVICE_TIERS:
        raise _invalid(
            f"Invalid value for 'service_tier': '{body.service_tier}' is not offered here; "
            "use 'auto' or 'default'.",
            "service_tier",
        )
    _check_response_format(body.response_format)
    if body.tools is not None and body.functions is not None:
        raise _invalid("Use 'tools' or the deprecated 'functions', not both.", "functions")
    names = _check_tools(body.tools)
    _check_tool_choice(body.tool_choice, names, "tool_choice", legacy=False)
    legacy_names = _check_functions(body.functions)
    _check_tool_choice(body.function_call, legacy_names, "function_call", legacy=True)


def _check_message_limits(messages: list[ChatMessage], settings: ApiSettings) -> None:
    if len(messages) > settings.max_messages:
        raise _invalid(
            f"Invalid 'messages': array too long. Expected an array with maximum length "
            f"{settings.max_messages}, but got an array with length {len(messages)} instead.",
            "messages",
            "array_above_max_length",
        )
    chars = sum(_content_chars(message) for message in messages)
    if chars > settings.max_messages_chars:
        raise _invalid(
            f"Invalid 'messages': content too long. Expected at most "
            f"{settings.max_messages_chars} characters of content across all messages, but got "
            f"{chars} characters instead.",
            "messages",
            "string_above_max_length",
        )


def _content_chars(message: ChatMessage) -> int:
    """The characters a message gives the model: its text, refusal and tool call arguments."""
    texts: list[Any] = [message.content, message.refusal]
    if isinstance(message.content, list):
        texts = [part.get("text") or part.get("refusal") for part in message.content]
        texts.append(message.refusal)
    for call in message.tool_calls or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            texts.append(call["function"].get("arguments"))
    if isinstance(message.function_call, dict):
        texts.append(message.function_call.get("arguments"))
    return sum(len(text) for text in texts if isinstance(text, str))


def _check_messages(messages: list[ChatMessage]) -> None:
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _check_content(message, where)
        if message.role == "tool":
            if not message.tool_call_id:
                raise _invalid(
                    f"Missing required parameter: '{where}.tool_call_id'.",
                    f"{where}.tool_call_id",
                    "missing_required_parameter",
                )
            if message.tool_call_id not in open_calls:
                raise _invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceding message with 'tool_calls' holding their 'tool_call_id'.",
                    f"{where}.role",
                )
        elif message.role == "assistant":
            open_calls = {
                call["id"]
                for call in message.tool_calls or []
                if isinstance(call, dict) and isinstance(call.get("id"), str)
            }
            for j, call in enumerate(message.tool_calls or []):
                _check_tool_call(call, f"{where}.tool_calls[{j}]")
        else:
            open_calls = set()
        if message.role == "function" and not message.name:
            raise _invalid(
                f"Missing required parameter: '{where}.name'.",
                f"{where}.name",
                "missing_required_parameter",
            )
        if message.role in ("system", "developer", "user", "tool") and message.content is None:
            raise _invalid(
                f"Missing required parameter: '{where}.content'.",
                f"{where}.content",
                "missing_required_parameter",
            )


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict) or not isinstance(call.get("id"), str):
        raise _invalid(f"Invalid '{where}': a tool call needs a string 'id'.", f"{where}.id")
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise _invalid(f"Invalid '{where}': expected a function tool call.", f"{where}.function")
    if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
        raise _invalid(
            f"Invalid '{where}.function': 'name' and 'arguments' must be strings.",
            f"{where}.function",
        )


def _check_content(message: ChatMessage, where: str) -> None:
    if not isinstance(message.content, list):
        return
    allowed = PART_TYPES[message.role]
    if not message.content and message.role != "assistant":
        raise _invalid(
            f"Invalid '{where}.content': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            f"{where}.content",
            "empty_array",
        )
    for j, part in enumerate(message.content):
        param = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind is None:
            raise _invalid(
                f"Missing required parameter: '{param}.type'.",
                f"{param}.type",
                "missing_required_parameter",
            )
        if not isinstance(kind, str):
            raise _invalid(
                f"Invalid type for '{param}.type': expected a string, but got "
                f"{_json_type(kind)} instead.",
                f"{param}.type",
                "invalid_type",
            )
        if kind not in allowed:
            raise _invalid(
                f"Invalid value: '{kind}'. Supported values for role '{message.role}' are: "
                + ", ".join(f"'{t}'" for t in sorted(allowed))
                + ".",
                f"{param}.type",
            )
        if kind not in ENGINE_PART_TYPES:
            raise _invalid(
                f"The served model does not support content parts of type '{kind}'.",
                f"{param}.type",
                "unsupported_value",
            )
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise _invalid(
                f"Missing required parameter: '{param}.{key}'.",
                f"{param}.{key}",
                "missing_required_parameter",
            )


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    check_storable(metadata, "metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise _invalid(
            f"Invalid 'metadata': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got an object with {len(metadata)} "
            "properties instead.",
            "metadata",
            "object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _invalid(
                f"Invalid 'metadata': key too long. Expected a key with maximum length "
                f"{MAX_METADATA_KEY}, but got a key with length {len(key)} instead.",
                f"metadata.{key}",
                "string_above_max_length",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise _invalid(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {MAX_METADATA_VALUE}, but got a string with length {len(value)} "
                "instead.",
                f"metadata.{key}",
                "string_above_max_length",
            )


def _check_logit_bias(bias: dict[str, int] | None) -> None:
    for token, value in (bias or {}).items():
        # isdigit alone takes '²', which int() refuses.
        if not (token.isascii() and token.isdigit()):
            raise _invalid(
                f"Invalid key in 'logit_bias': {token!r}. Keys must be token ids (integers).",
                f"logit_bias.{token}",
                "invalid_type",
            )
        check_range(value, -100, 100, f"logit_bias.{token}")


def _check_response_format(fmt: dict[str, Any] | None) -> None:
    if fmt is None:
        return
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid(
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object' and "
            "'json_schema'.",
            "response_format.type",
        )
    if kind != "json_schema":
        return
    schema = fmt.get("json_schema")
    if not isinstance(schema, dict):
        raise _invalid(
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format.json_schema",
            "missing_required_parameter",
        )
    if not isinstance(schema.get("name"), str) or not FUNCTION_NAME.match(schema["name"]):
        raise _invalid(
            "Invalid 'response_format.json_schema.name': a name of letters, digits, '_' and "
            "'-', at most 64 characters, is required.",
            "response_format.json_schema.name",
        )
    if "schema" in schema and not isinstance(schema["schema"], dict):
        raise _invalid(
            "Invalid type for 'response_format.json_schema.schema': expected an object.",
            "response_format.json_schema.schema",
            "invalid_type",
        )


def _check_function(function: Any, where: str) -> str:
    if not isinstance(function, dict):
        raise _invalid(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise _invalid(
            f"Invalid '{where}.name': a name of letters, digits, '_' and '-', at most 64 "
            "characters, is required.",
            f"{where}.name",
        )
    if "parameters" in function and not isinstance(function["parameters"], dict):
        raise _invalid(
            f"Invalid type for '{where}.parameters': expected a JSON Schema object.",
            f"{where}.parameters",
            "invalid_type",
        )
    return name


def _check_tools(tools: list[dict[str, Any]] | None) -> set[str]:
    names: set[str] = set()
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise _invalid(
                f"Invalid value: '{tool.get('type')}'. Only tools of type 'function' are "
                "supported.",
                f"tools[{i}].type",
            )
        names.add(_check_function(tool.get("function"), f"tools[{i}].function"))
    return names


def _check_functions(functions: list[dict[str, Any]] | None) -> set[str]:
    return {_check_function(f, f"functions[{i}]") for i, f in enumerate(functions or [])}


def _check_tool_choice(choice: Any, names: set[str], param: str, legacy: bool) -> None:
    if choice is None:
        return
    modes = ("none", "auto") if legacy else ("none", "auto", "required")
    if isinstance(choice, str):
        if choice not in modes:
            raise _invalid(
                f"Invalid value: '{choice}'. Supported values are: "
                + ", ".join(f"'{m}'" for m in modes)
                + " or a named function.",
                param,
            )
        if choice != "none" and not names:
            raise _invalid(
                f"Invalid value for '{param}': '{choice}' needs "
                + ("'functions'." if legacy else "'tools'."),
                param,
            )
        return
    if not legacy and choice.get("type") != "function":
        raise _invalid(
            "Invalid value for 'tool_choice.type': expected 'function'.", f"{param}.type"
        )
    function, where = (choice, param) if legacy else (choice.get("function"), f"{param}.function")
    if function is None:
        raise _invalid(
            f"Missing required parameter: '{where}'.", where, "missing_required_parameter"
        )
    if not isinstance(function, dict):
        raise _invalid(
            f"Invalid type for '{where}': expected an object, but got {_json_type(function)} "
            "instead.",
            where,
            "invalid_type",
        )
    name = function.get("name")
    if name is None:
        raise _invalid(
            f"Missing required parameter: '{where}.name'.",
            f"{where}.name",
            "missing_required_parameter",
        )
    if not isinstance(name, str):
        raise _invalid(
            f"Invalid type for '{where}.name': expected a string, but got {_json_type(name)} "
            "instead.",
            f"{where}.name",
            "invalid_type",
        )
    if name not in names:
        raise _invalid(
            f"Invalid value for '{param}': no function named {name!r} is in "
            + ("'functions'." if legacy else "'tools'."),
            param,
        )


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
