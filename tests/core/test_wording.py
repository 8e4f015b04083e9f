"""How pydantic's errors become OpenAI's param paths and codes."""

import pytest

from core.wire.requests import ChatCompletionRequest
from core.wire.wording import describe, param_path


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("temperature",), "temperature"),
        (("messages", 2, "role"), "messages[2].role"),
        (("stop", "list[str]", 4), "stop[4]"),
        (("stop", "str"), "stop"),
        (("metadata", "mykey"), "metadata.mykey"),
        ((), None),
    ],
)
def test_param_path(loc, expected) -> None:
    assert param_path(loc) == expected


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        # A tagged union's tag is left out, even where it is also a field's name.
        (
            ("messages", 0, "user", "content", "list[...]", 1, "text", "text"),
            "messages[0].content[1].text",
        ),
        (("tools", 0, "function", "function", "name"), "tools[0].function.name"),
        (("tool_choice", "tagged-union[...]", "function", "function"), "tool_choice.function"),
        (("function_call", "ToolName", "name"), "function_call.name"),
        (
            ("response_format", "json_schema", "json_schema", "schema"),
            "response_format.json_schema.schema",
        ),
        (("logit_bias", "x", "[key]"), "logit_bias.x"),
    ],
)
def test_param_path_through_the_request_type(loc, expected) -> None:
    assert param_path(loc, ChatCompletionRequest) == expected


def test_describe_limits_like_openai() -> None:
    message, param, code = describe(
        {"type": "less_than_equal", "loc": ("temperature",), "input": 5, "ctx": {"le": 2.0}}
    )
    assert message == (
        "Invalid 'temperature': decimal above maximum value. "
        "Expected a value <= 2, but got 5 instead."
    )
    assert (param, code) == ("temperature", "decimal_above_max_value")
    _, _, code = describe(
        {"type": "greater_than_equal", "loc": ("n",), "input": 0, "ctx": {"ge": 1}}
    )
    assert code == "integer_below_min_value"
