"""The worker's translation between OpenAI's wire format and vLLM's (no engine needed)."""

from tests.openai_schema import validate
from workers import shaping

ANSWERING = shaping.Answering(id="chatcmpl-x", model="m", created=1, system_fingerprint="fp_1")
WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}


def test_engine_fields_map_roles_functions_and_stream_usage() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ],
        "functions": [WEATHER],
        "function_call": {"name": "get_weather"},
        "metadata": {"a": "b"},
        "store": True,
        "stream_options": {"include_usage": False},
    }
    fields = shaping.engine_fields(body, stream=True)
    assert [m["role"] for m in fields["messages"]] == ["system", "user", "assistant", "tool"]
    call = fields["messages"][2]["tool_calls"][0]
    assert fields["messages"][3]["tool_call_id"] == call["id"]
    assert fields["tools"] == [{"type": "function", "function": WEATHER}]
    assert fields["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert fields["stream_options"] == {"include_usage": True}
    assert not {"metadata", "store", "functions", "function_call"} & set(fields)
    assert body["messages"][0]["role"] == "developer"  # the stored request is left alone


def raw_completion(**message) -> dict:
    return {
        "id": "vllm-id",
        "created": 99,
        "model": "/path",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "tool_calls"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "prompt_logprobs": None,
    }


def test_completion_is_openai_shaped_and_labelled() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = shaping.completion(raw_completion(content=None, tool_calls=[call]), ANSWERING)
    validate("CreateChatCompletionResponse", body)
    assert (body["id"], body["model"], body["created"]) == ("chatcmpl-x", "m", 1)
    assert body["system_fingerprint"] == "fp_1" and body["service_tier"] == "default"
    assert body["choices"][0]["message"]["tool_calls"] == [call]
    assert "prompt_logprobs" not in body


def test_legacy_functions_answer_with_function_call() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    legacy = shaping.Answering(**{**ANSWERING.__dict__, "legacy_functions": True})
    body = shaping.completion(raw_completion(content=None, tool_calls=[call]), legacy)
    validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "f", "arguments": "{}"}
    assert "tool_calls" not in choice["message"]


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "v", "created": 5, "model": "/p", "choices": choices, "usage": usage}


def test_usage_chunk_only_when_asked() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert shaping.chunk(chunk({}, usage=usage), ANSWERING) is None
    asked = shaping.Answering(**{**ANSWERING.__dict__, "include_usage": True})
    body = shaping.chunk(chunk({}, usage=usage), asked)
    validate("CreateChatCompletionStreamResponse", body)
    assert body["choices"] == [] and body["usage"]["total_tokens"] == 2


def test_assembler_rebuilds_the_completion_from_chunks() -> None:
    assembler = shaping.StreamAssembler(ANSWERING)
    for raw in [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}, finish="stop"),
        chunk({}, usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}),
    ]:
        assembler.add(raw)
    body = assembler.completion()
    validate("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["usage"]["total_tokens"] == 6


def test_assembler_joins_tool_call_fragments() -> None:
    assembler = shaping.StreamAssembler(ANSWERING)
    first = {
        "index": 0,
        "id": "call_9",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a'},
    }
    assembler.add(chunk({"tool_calls": [first]}))
    assembler.add(
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '": 1}'}}]}, "tool_calls")
    )
    message = assembler.completion()["choices"][0]["message"]
    assert message["tool_calls"] == [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert message["content"] is None


def test_markup_filter_hides_the_tool_tag_and_releases_plain_text() -> None:
    tagged = shaping.ToolMarkupFilter()
    pieces = [chunk({"content": t}) for t in ["<", "tool", "_call", ">"]]
    pieces.append(chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]}))
    for raw in pieces:
        tagged(raw)
    assert all(not p["choices"][0]["delta"].get("content") for p in pieces)

    plain = shaping.ToolMarkupFilter()
    first, second = chunk({"content": "<"}), chunk({"content": "b>bold"})
    plain(first)
    plain(second)
    assert first["choices"][0]["delta"]["content"] is None
    assert second["choices"][0]["delta"]["content"] == "<b>bold"

    ends = shaping.ToolMarkupFilter()
    held, last = chunk({"content": "<tool"}), chunk({"content": ""}, finish="stop")
    ends(held)
    ends(last)
    assert last["choices"][0]["delta"]["content"] == "<tool"
