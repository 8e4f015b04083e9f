"""JSON schemas that the OpenAPI document shows for request fields whose Python types say less.

`core.wire` keeps loose types (`dict[str, Any]`) where OpenAI's shapes are unions, and
`core.validation` checks the rest with OpenAI's messages; these schemas tell clients (and
generated tests) the same rules: what each role's message holds, the response formats, tools.
Rules across fields (a tool message answers an earlier call; `tool_choice` names a tool) are left
to `core.validation`.
"""

from typing import Any

JsonSchema = dict[str, Any]

NAME_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"
_STRING: JsonSchema = {"type": "string"}


def _part(kind: str) -> JsonSchema:
    return {
        "type": "object",
        "properties": {"type": {"const": kind}, kind: _STRING},
        "required": ["type", kind],
    }


def _content(*kinds: str) -> JsonSchema:
    parts = [_part(kind) for kind in kinds]
    return {
        "anyOf": [
            _STRING,
            {
                "type": "array",
                "minItems": 1,
                "items": parts[0] if len(parts) == 1 else {"anyOf": parts},
            },
        ]
    }


def _message(role: str, required: list[str], **properties: JsonSchema) -> JsonSchema:
    return {
        "type": "object",
        "title": f"{role.capitalize()}Message",
        "properties": {"role": {"const": role}, **properties},
        "required": ["role", *required],
        "additionalProperties": False,
    }


_NULLABLE_STRING: JsonSchema = {"anyOf": [_STRING, {"type": "null"}]}
FUNCTION_CALL: JsonSchema = {
    "type": "object",
    "properties": {"name": _STRING, "arguments": _STRING},
    "required": ["name", "arguments"],
}
TOOL_CALL: JsonSchema = {
    "type": "object",
    "properties": {"id": _STRING, "type": {"const": "function"}, "function": FUNCTION_CALL},
    "required": ["id", "type", "function"],
}

# `ChatCompletionRequestMessage`, as far as the served models read: text only.
MESSAGE: JsonSchema = {
    "oneOf": [
        _message("system", ["content"], content=_content("text"), name=_STRING),
        _message("developer", ["content"], content=_content("text"), name=_STRING),
        _message("user", ["content"], content=_content("text"), name=_STRING),
        _message(
            "assistant",
            [],
            content={"anyOf": [_content("text", "refusal"), {"type": "null"}]},
            refusal=_NULLABLE_STRING,
            name=_STRING,
            tool_calls={"type": "array", "items": TOOL_CALL},
            function_call={"anyOf": [FUNCTION_CALL, {"type": "null"}]},
        ),
        _message(
            "tool", ["content", "tool_call_id"], content=_content("text"), tool_call_id=_STRING
        ),
        _message("function", ["name"], content=_NULLABLE_STRING, name=_STRING),
    ]
}

METADATA: JsonSchema = {
    "type": "object",
    "maxProperties": 16,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
}

RESPONSE_FORMAT: JsonSchema = {
    "oneOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
        {"type": "object", "properties": {"type": {"const": "json_object"}}, "required": ["type"]},
        {
            "type": "object",
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": NAME_PATTERN},
                        "description": _STRING,
                        "schema": {"type": "object"},
                        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    },
                    "required": ["name"],
                },
            },
            "required": ["type", "json_schema"],
        },
    ]
}

FUNCTION: JsonSchema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "description": _STRING,
        "parameters": {"type": "object"},
        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    },
    "required": ["name"],
}
TOOLS: JsonSchema = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"type": {"const": "function"}, "function": FUNCTION},
        "required": ["type", "function"],
    },
}
TOOL_CHOICE: JsonSchema = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "properties": {"name": _STRING},
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
    ]
}
FUNCTIONS: JsonSchema = {"type": "array", "minItems": 1, "maxItems": 128, "items": FUNCTION}
FUNCTION_CHOICE: JsonSchema = {
    "anyOf": [
        {"enum": ["none", "auto"]},
        {"type": "object", "properties": {"name": _STRING}, "required": ["name"]},
    ]
}
LOGIT_BIAS: JsonSchema = {
    "type": "object",
    "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
}
STREAM_OPTIONS: JsonSchema = {
    "type": "object",
    "properties": {
        "include_usage": {"type": "boolean"},
        "include_obfuscation": {"type": "boolean"},
    },
}
