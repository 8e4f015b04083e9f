"""Each rule of OpenAI's request validation, tried with a value just outside it: 400, OpenAI's
envelope with the field's path and code, and no job created."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine

from core.errors import InvalidRequestError
from core.validation import check_request
from core.wire.requests import ChatCompletionRequest
from core.wire.wording import refused
from tests.api.test_api_errors import URL, assert_envelope, count_jobs
from tests.conftest import MODEL

USER = {"role": "user", "content": "hi"}
GOOD = {"model": MODEL, "messages": [USER]}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def with_(**fields):
    return {**GOOD, **fields}


CASES = [
    # ranges, each just outside
    (with_(temperature=2.01), "temperature", "decimal_above_max_value"),
    (with_(temperature=-0.01), "temperature", "decimal_below_min_value"),
    (with_(top_p=1.01), "top_p", "decimal_above_max_value"),
    (with_(top_p=-0.01), "top_p", "decimal_below_min_value"),
    (with_(n=129), "n", "integer_above_max_value"),
    (with_(n=0), "n", "integer_below_min_value"),
    (with_(frequency_penalty=2.01), "frequency_penalty", "decimal_above_max_value"),
    (with_(frequency_penalty=-2.01), "frequency_penalty", "decimal_below_min_value"),
    (with_(presence_penalty=2.01), "presence_penalty", "decimal_above_max_value"),
    (with_(presence_penalty=-2.01), "presence_penalty", "decimal_below_min_value"),
    (with_(logit_bias={"50": 101}), "logit_bias.50", "integer_above_max_value"),
    (with_(logit_bias={"50": -101}), "logit_bias.50", "integer_below_min_value"),
    (with_(logit_bias={"hello": 1}), "logit_bias.hello", "invalid_type"),
    (with_(logprobs=True, top_logprobs=21), "top_logprobs", "integer_above_max_value"),
    (with_(logprobs=True, top_logprobs=-1), "top_logprobs", "integer_below_min_value"),
    (with_(top_logprobs=2), "top_logprobs", "invalid_value"),
    (with_(logprobs=False, top_logprobs=2), "top_logprobs", "invalid_value"),
    (with_(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    (with_(stop=[]), "stop", "empty_array"),
    (with_(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (with_(max_tokens=0), "max_tokens", "integer_below_min_value"),
    (with_(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value"),
    # metadata
    (with_(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "object_above_max_properties"),
    (with_(metadata={"k" * 65: "v"}), "metadata." + "k" * 65, "string_above_max_length"),
    (with_(metadata={"mykey": "v" * 513}), "metadata.mykey", "string_above_max_length"),
    (with_(metadata={"mykey": 5}), "metadata.mykey", "invalid_type"),
    # messages
    (with_(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value"),
    (with_(messages=[USER, USER, {"role": "boss", "content": "x"}]), "messages[2].role", None),
    (with_(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (with_(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    (with_(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty_array"),
    (
        with_(messages=[{"role": "user", "content": [{"type": "video", "text": "x"}]}]),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        with_(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        with_(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
        "missing_required_parameter",
    ),
    (
        with_(
            messages=[{"role": "tool", "content": [{"type": {}, "text": ""}], "tool_call_id": ""}]
        ),
        "messages[0].content[0].type",
        "invalid_type",
    ),
    (
        with_(tools=[TOOL], tool_choice={"type": "function", "function": {"name": {}}}),
        "tool_choice.function.name",
        "invalid_type",
    ),
    (
        with_(messages=[USER, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]),
        "messages[1].role",
        "invalid_value",
    ),
    (
        with_(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "42"},
            ]
        ),
        "messages[2].role",
        "invalid_value",
    ),
    (
        with_(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "content": "4"},
            ]
        ),
        "messages[2].tool_call_id",
        "missing_required_parameter",
    ),
    # tools and functions
    (
        with_(tools=[{"type": "function", "function": {"name": "bad name"}}]),
        "tools[0].function.name",
        "invalid_value",
    ),
    (with_(tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value"),
    (with_(tool_choice="required"), "tool_choice", "invalid_value"),
    (with_(tools=[TOOL], tool_choice="sometimes"), "tool_choice", "invalid_value"),
    (
        with_(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        "tool_choice",
        "invalid_value",
    ),
    (
        with_(functions=[TOOL["function"]], function_call={"name": "g"}),
        "function_call",
        "invalid_value",
    ),
    (with_(response_format={"type": "yaml"}), "response_format.type", "invalid_value"),
    (
        with_(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema.name",
        "missing_required_parameter",
    ),
    (with_(service_tier="flex"), "service_tier", "invalid_value"),
    # features this model does not have
    (with_(reasoning_effort="low"), "reasoning_effort", "unsupported_parameter"),
    (with_(modalities=["text", "audio"]), "modalities", "unsupported_parameter"),
    (with_(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
    (with_(web_search_options={}), "web_search_options", "unsupported_parameter"),
    (with_(verbosity="low"), "verbosity", "unsupported_parameter"),
]


@pytest.mark.parametrize(
    ("body", "param", "code"), CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)]
)
def test_rule(live_worker, http: httpx.Client, db: Engine, body, param, code) -> None:
    before = count_jobs(db)
    error = assert_envelope(http.post(URL, json=body), 400, param, code or "invalid_value")
    assert count_jobs(db) == before
    if code == "unsupported_parameter":
        assert "does not support" in error["message"]


def test_values_at_the_limits_are_accepted(client) -> None:
    """The same rules do not refuse the edges themselves."""
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            USER,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        temperature=2,
        top_p=1,
        frequency_penalty=-2,
        presence_penalty=2,
        logit_bias={"50": 100, "51": -100},
        logprobs=True,
        top_logprobs=20,
        stop=["a", "b", "c", "d"],
        metadata={f"k{i}": "v" * 512 for i in range(16)},
        n=2,
        max_completion_tokens=2,
        service_tier="default",
    )
    assert len(completion.choices) == 2


# A request that passes every check, with a value at each path the checks read.
EVERYTHING = {
    "model": MODEL,
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "me"},
        {
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "no"}],
            "tool_calls": [CALL],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "42"}]},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "42"},
    ],
    "metadata": {"k": "v"},
    "logit_bias": {"50": 1},
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
    "tools": [TOOL],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
}
LEGACY = {
    "model": MODEL,
    "messages": [USER],
    "functions": [TOOL["function"]],
    "function_call": {"name": "f"},
}


def _refusal(body: dict) -> tuple[str | None, str | None] | None:
    """The (param, code) the types or `check_request` refuse `body` with; None if it passes."""
    try:
        check_request(ChatCompletionRequest.model_validate(body))
    except ValidationError as exc:
        error = refused(exc, ChatCompletionRequest)
        return error.param, error.code
    except InvalidRequestError as exc:
        return exc.param, exc.code
    return None


def test_the_templates_pass() -> None:
    assert _refusal(EVERYTHING) is None
    assert _refusal(LEGACY) is None


def _message(**fields):
    return with_(messages=[USER, {"role": "assistant", "tool_calls": [CALL]}, fields])


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        # OpenAI's spec found it: a 500 (unhashable type) before.
        (
            with_(messages=[{"role": "tool", "content": [{"type": {}, "text": ""}]}]),
            "messages[0].content[0].type",
            "invalid_type",
        ),
        (
            with_(messages=[{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]),
            "messages[0].content[0].type",
            "invalid_type",
        ),
        (
            with_(messages=[{"role": "user", "content": [{"type": 1, "text": "x"}]}]),
            "messages[0].content[0].type",
            "invalid_type",
        ),
        (
            with_(messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "messages[0].content[0].type",
            "missing_required_parameter",
        ),
        (
            _message(role="tool", tool_call_id="call_1", content=[{"type": {}}]),
            "messages[2].content[0].type",
            "invalid_type",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function", "function": {"name": {}}}),
            "tool_choice.function.name",
            "invalid_type",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function", "function": {"name": ["f"]}}),
            "tool_choice.function.name",
            "invalid_type",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function", "function": {}}),
            "tool_choice.function.name",
            "missing_required_parameter",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function", "function": "f"}),
            "tool_choice.function",
            "invalid_type",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function", "function": ["f"]}),
            "tool_choice.function",
            "invalid_type",
        ),
        (
            with_(tools=[TOOL], tool_choice={"type": "function"}),
            "tool_choice.function",
            "missing_required_parameter",
        ),
        (with_(tools=[TOOL], tool_choice={"type": {}}), "tool_choice.type", "invalid_type"),
        (
            with_(functions=[TOOL["function"]], function_call={"name": {}}),
            "function_call.name",
            "invalid_type",
        ),
        (
            with_(functions=[TOOL["function"]], function_call={}),
            "function_call.name",
            "missing_required_parameter",
        ),
        (with_(tools=[{"type": {}}]), "tools[0].type", "invalid_type"),
        (
            with_(tools=[{"type": "function", "function": {"name": {}}}]),
            "tools[0].function.name",
            "invalid_type",
        ),
        (with_(response_format={"type": {}}), "response_format.type", "invalid_type"),
        (
            _message(role="assistant", tool_calls=[{**CALL, "id": {}}]),
            "messages[2].tool_calls[0].id",
            "invalid_type",
        ),
        (
            _message(role="assistant", tool_calls=[{**CALL, "type": {}}]),
            "messages[2].tool_calls[0].type",
            "invalid_type",
        ),
        # '²' is a digit to str.isdigit, and not to int().
        (with_(logit_bias={"²": 1}), "logit_bias.²", "invalid_type"),
    ],
)
def test_values_of_any_json_type_are_refused_not_crashed_on(body, param, code) -> None:
    """Every value a check uses as a key, a set member or in a comparison may be any JSON."""
    assert _refusal(body) == (param, code)


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path to every value inside `value`, containers included."""
    yield path
    if isinstance(value, dict | list):
        for key, child in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _paths(child, (*path, key))


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=4,
)
TEMPLATES = [(template, path) for template in (EVERYTHING, LEGACY) for path in _paths(template)]


@given(where=st.sampled_from(TEMPLATES), value=JSON)
@settings(max_examples=1500, derandomize=True, database=None)
def test_any_json_anywhere_is_accepted_or_refused(where, value) -> None:
    """Any JSON value at any place of a valid request: the types refuse it, the checks refuse it
    with a param, or it passes; nothing else (no exception that would be a 500)."""
    template, path = where
    try:
        body = ChatCompletionRequest.model_validate(_replaced(template, path, value))
    except ValidationError:
        return
    try:
        check_request(body)
    except InvalidRequestError as exc:
        assert exc.param
