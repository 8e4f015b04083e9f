"""The OpenAPI validation helper, checked against OpenAI's spec (no servers needed)."""

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests import openai_schema
from tests.openai_schema import to_json_schema, validate, validator

COMPONENTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
    "ChatCompletionList",
    "ChatCompletionDeleted",
    "ChatCompletionMessageList",
    "ListModelsResponse",
    "Model",
    "Batch",
    "OpenAIFile",
    "ListBatchesResponse",
    "ListFilesResponse",
    "DeleteFileResponse",
]

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "qwen",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}

CHUNK: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "qwen",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hel"},
            "finish_reason": None,
            "logprobs": None,
        }
    ],
}

NULLABLE_INTEGER_SPEC = (
    "components:\n  schemas:\n    N:\n      type: integer\n      nullable: true\n"
)


def changed(base: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of base with the dotted path (list indexes as digits) set, or deleted if ..."""
    result = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = result
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return result


def errors_of(component: str, instance: object) -> str:
    """The AssertionError message validate raises for an invalid instance."""
    with pytest.raises(AssertionError) as excinfo:
        validate(component, instance)
    return str(excinfo.value)


@pytest.mark.parametrize("component", COMPONENTS)
def test_project_components_exist_and_are_valid_schemas(component: str) -> None:
    Draft202012Validator.check_schema(openai_schema.document()["components"]["schemas"][component])
    assert validator(component) is validator(component)


def test_unknown_component_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="NoSuchThing"):
        validate("NoSuchThing", {})


def test_minimal_chat_completion_validates() -> None:
    validate("CreateChatCompletionResponse", COMPLETION)


def test_bad_finish_reason_is_reported_with_path_and_keyword() -> None:
    message = errors_of(
        "CreateChatCompletionResponse", changed(COMPLETION, "choices.0.finish_reason", "banana")
    )
    assert "$.choices[0].finish_reason: [enum] 'banana' is not one of" in message


def test_missing_choices_fails() -> None:
    message = errors_of("CreateChatCompletionResponse", changed(COMPLETION, "choices", ...))
    assert "$: [required] 'choices' is a required property" in message


def test_all_errors_are_listed_at_most_five() -> None:
    instance = {"object": "chunk", "created": "now", "choices": {}, "usage": 1, "metadata": 2}
    message = errors_of("CreateChatCompletionResponse", instance)
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert "(7 error(s))" in message and len(lines) == 5 and "... and 2 more" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tool_calls", None),  # array of tool calls: omit it when there are none
        ("function_call", None),  # deprecated object, not nullable
        ("annotations", None),  # array, not nullable
        ("content", ...),  # role, content and refusal are required (content/refusal nullable)
        ("refusal", ...),
        ("role", ...),
        ("role", "user"),  # const "assistant"
    ],
)
def test_response_message_rejects(field: str, value: object) -> None:
    instance = changed(COMPLETION, f"choices.0.message.{field}", value)
    message = errors_of("CreateChatCompletionResponse", instance)
    assert "$.choices[0].message" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", None),
        ("tool_calls", []),
        ("annotations", []),
        (
            "tool_calls",
            [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        ),
        ("function_call", {"name": "f", "arguments": "{}"}),
        ("content", None),
    ],
)
def test_response_message_accepts(field: str, value: object) -> None:
    validate(
        "CreateChatCompletionResponse", changed(COMPLETION, f"choices.0.message.{field}", value)
    )


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("service_tier", None, True),
        ("service_tier", "default", True),
        ("metadata", None, True),
        ("system_fingerprint", None, False),  # a string when present: omit rather than null
        ("system_fingerprint", "fp_1", True),
        ("usage", None, False),  # optional, but not nullable in the non-streaming response
        ("usage.prompt_tokens_details", {"cached_tokens": 0}, True),
        ("usage.prompt_tokens_details", None, False),
        ("usage.completion_tokens_details", {"reasoning_tokens": 0}, True),
        ("usage.completion_tokens_details", None, False),
        ("choices.0.logprobs", ..., False),  # required, nullable
        ("choices.0.logprobs", {"content": [], "refusal": None}, True),
    ],
)
def test_completion_top_level_fields(field: str, value: object, valid: bool) -> None:
    instance = changed(COMPLETION, field, value)
    if valid:
        validate("CreateChatCompletionResponse", instance)
    else:
        errors_of("CreateChatCompletionResponse", instance)


def test_error_response() -> None:
    error = {"message": "x", "type": "invalid_request_error", "param": None, "code": None}
    validate("ErrorResponse", {"error": error})
    message = errors_of("ErrorResponse", {"error": changed(error, "message", ...)})
    assert "$.error: [required] 'message' is a required property" in message


def test_stream_chunks() -> None:
    validate("CreateChatCompletionStreamResponse", CHUNK)
    last = changed(CHUNK, "choices", [])
    last["usage"] = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    validate("CreateChatCompletionStreamResponse", last)
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "usage", None))
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.logprobs", ...))
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.delta", {}))
    final = changed(CHUNK, "choices.0.finish_reason", "stop")
    validate("CreateChatCompletionStreamResponse", final)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("choices.0.finish_reason", ..., "[required] 'finish_reason' is a required property"),
        ("choices.0.delta", ..., "[required] 'delta' is a required property"),
        ("choices.0.index", ..., "[required] 'index' is a required property"),
        ("choices.0.finish_reason", "banana", "$.choices[0].finish_reason: [enum]"),
        ("choices.0.delta.role", "banana", "$.choices[0].delta.role: [enum]"),
        ("choices.0.delta.tool_calls", None, "$.choices[0].delta.tool_calls: [type]"),
        ("object", "chat.completion", "$.object: [enum]"),
    ],
)
def test_stream_chunk_rejects(path: str, value: object, expected: str) -> None:
    message = errors_of("CreateChatCompletionStreamResponse", changed(CHUNK, path, value))
    assert expected in message


def test_nullable_fields_from_the_spec_accept_null() -> None:
    # CreateChatCompletionRequest: `max_completion_tokens` and `n` are {type: integer, nullable}.
    request = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    validate("CreateChatCompletionRequest", {**request, "max_completion_tokens": None, "n": None})
    validate("CreateChatCompletionRequest", {**request, "n": 2})
    assert "$.n: [minimum]" in errors_of("CreateChatCompletionRequest", {**request, "n": 0})
    message = errors_of("CreateChatCompletionRequest", {**request, "max_completion_tokens": "x"})
    assert "$.max_completion_tokens: [type]" in message


def accepts(schema: dict[str, Any], instance: object) -> bool:
    """Whether the converted schema accepts the instance."""
    return Draft202012Validator(to_json_schema(schema)).is_valid(instance)


def test_conversion_of_nullable() -> None:
    assert accepts({"type": "integer", "nullable": True}, None)
    assert not accepts({"type": "integer", "nullable": True}, "x")
    assert not accepts({"type": "integer"}, None)
    assert not accepts({"type": "integer", "nullable": False}, None)
    enum = {"type": "string", "enum": ["a", "b"], "nullable": True}
    assert accepts(enum, None) and accepts(enum, "a") and not accepts(enum, "c")
    one_of = {
        "oneOf": [{"type": "string", "nullable": True}, {"type": "integer"}],
        "nullable": True,
    }
    assert accepts(one_of, None) and accepts(one_of, 1) and not accepts(one_of, 1.5)
    all_of = {"allOf": [{"type": "object", "required": ["a"]}, {"nullable": True}]}
    assert accepts(all_of, None) and accepts(all_of, {"a": 1}) and not accepts(all_of, {})
    keyword_named = {"type": "object", "properties": {"nullable": {"type": "boolean"}}}
    assert to_json_schema(keyword_named) == keyword_named


def test_conversion_of_ref_and_boolean_exclusive_minimum() -> None:
    thing = {"type": "object", "required": ["a"]}
    ref = {"$defs": {"T": thing}, "items": {"$ref": "#/$defs/T", "nullable": True}}
    assert accepts(ref, [None, {"a": 1}]) and not accepts(ref, [{}])
    exclusive = {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert not accepts(exclusive, 0) and accepts(exclusive, 0.5)
    assert accepts({"type": "number", "minimum": 0, "exclusiveMinimum": False}, 0)


@pytest.fixture
def tiny_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the helper at a one-schema spec and a fresh cache folder."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(NULLABLE_INTEGER_SPEC)
    monkeypatch.setattr(openai_schema, "SPEC", spec)
    monkeypatch.setattr(openai_schema, "CACHE_DIR", tmp_path / "cache")
    openai_schema.clear_caches()
    yield spec
    openai_schema.clear_caches()


def test_cache_is_written_reused_and_rebuilt(tiny_spec: Path) -> None:
    cache_dir = tiny_spec.parent / "cache"
    validate("N", None)
    (cache,) = cache_dir.glob("openai-openapi-*.json")
    assert json.loads(cache.read_text())["components"]["schemas"]["N"]["type"] == [
        "integer",
        "null",
    ]

    cache.write_text(json.dumps({"components": {"schemas": {"N": {"type": "string"}}}}))
    openai_schema.clear_caches()  # as in a new process
    validate("N", "read from the cache file, not the spec")

    tiny_spec.write_text("components:\n  schemas:\n    N:\n      type: boolean\n")
    openai_schema.clear_caches()
    validate("N", True)  # the spec's sha256 changed: rebuilt, and the stale file removed
    (rebuilt,) = cache_dir.iterdir()
    assert rebuilt != cache

    tiny_spec.write_text(NULLABLE_INTEGER_SPEC)  # back to the first sha256, whose file is corrupt
    cache.write_text("{not json")
    openai_schema.clear_caches()
    validate("N", None)
    assert json.loads(cache.read_text())["components"]["schemas"]["N"]["type"][0] == "integer"
