"""Each rule of OpenAI's request validation, tried with a value just outside it: 400, OpenAI's
envelope with the field's path and code, and no job created."""

import httpx
import pytest
from sqlalchemy import Engine

from tests.conftest import MODEL
from tests.test_api_errors import URL, assert_envelope, count_jobs

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
        "invalid_value",
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
