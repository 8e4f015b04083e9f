"""How pydantic's errors become OpenAI's param paths and codes."""

import pytest

from api.errors import describe, param_path


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 2, "role"), "messages[2].role"),
        (("body", "stop", "list[str]", 4), "stop[4]"),
        (("body", "stop", "str"), "stop"),
        (("body", "metadata", "mykey"), "metadata.mykey"),
        (("body",), None),
    ],
)
def test_param_path(loc, expected) -> None:
    assert param_path(loc) == expected


def test_describe_limits_like_openai() -> None:
    message, param, code = describe(
        {"type": "less_than_equal", "loc": ("body", "temperature"), "input": 5, "ctx": {"le": 2.0}}
    )
    assert message == (
        "Invalid 'temperature': decimal above maximum value. "
        "Expected a value <= 2, but got 5 instead."
    )
    assert (param, code) == ("temperature", "decimal_above_max_value")
    _, _, code = describe(
        {"type": "greater_than_equal", "loc": ("body", "n"), "input": 0, "ctx": {"ge": 1}}
    )
    assert code == "integer_below_min_value"
