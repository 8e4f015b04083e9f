"""Every request field through the official SDK against the real engine; every response and
stream chunk validated against OpenAI's own schemas."""

import json
import time

import openai
import pydantic
import pytest
from sqlalchemy import Engine, text

from tests.conftest import MODEL
from tests.openai_schema import validate

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def create(client: openai.OpenAI, **fields) -> dict:
    """A non-streamed completion as the raw JSON the server sent, checked against the spec."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, **fields)
    body = raw.http_response.json()
    validate("CreateChatCompletionResponse", body)
    raw.parse()  # and the SDK can read it
    return body


def stream(client: openai.OpenAI, **fields) -> list[dict]:
    """A streamed completion's chunks, each checked against the spec."""
    chunks = []
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, stream=True, **fields
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line[len("data: ") :])
        validate("CreateChatCompletionStreamResponse", chunk)
        chunks.append(chunk)
    return chunks


def test_response_is_filled_as_openai_fills_it(client: openai.OpenAI) -> None:
    body = create(client, messages=FRANCE, user="user-1234", service_tier="auto")
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert abs(body["created"] - time.time()) < 120
    assert body["model"] == MODEL
    assert body["service_tier"] == "default"
    assert body["system_fingerprint"].startswith("fp_")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and "Paris" in message["content"]
    assert message["refusal"] is None
    assert "tool_calls" not in message and "function_call" not in message
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "cached_tokens" in usage["prompt_tokens_details"]
    # The same engine and model answer with the same fingerprint.
    assert (
        create(client, messages=FRANCE, max_tokens=2)["system_fingerprint"]
        == (body["system_fingerprint"])
    )


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a geography teacher. " * 60}
    create(client, messages=[system, *FRANCE], max_tokens=2)
    again = create(client, messages=[system, *FRANCE], max_tokens=2)
    details = again["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] > 0
    assert details["cached_tokens"] <= again["usage"]["prompt_tokens"]


def test_user_is_stored(client: openai.OpenAI, db: Engine) -> None:
    body = create(client, messages=FRANCE, max_tokens=2, user="user-42", store=True)
    with db.connect() as conn:
        request = conn.execute(
            text("SELECT request FROM jobs WHERE id = :id"), {"id": body["id"]}
        ).scalar_one()
    assert request["user"] == "user-42"


def test_max_completion_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    body = create(client, messages=FRANCE, max_completion_tokens=3, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def tokenizer(live_worker):
    from transformers import AutoTokenizer

    folder = live_worker.ferry("model", "prepare").strip().splitlines()[-1]
    return AutoTokenizer.from_pretrained(folder)


def test_logit_bias_bans_a_token(client: openai.OpenAI, tokenizer) -> None:
    base = create(client, messages=FRANCE, temperature=0, max_tokens=8)
    content = base["choices"][0]["message"]["content"]
    first = tokenizer.encode(content)[0]
    banned = create(
        client, messages=FRANCE, temperature=0, max_tokens=8, logit_bias={str(first): -100}
    )
    assert tokenizer.encode(banned["choices"][0]["message"]["content"])[0] != first


def test_penalties_reach_the_engine(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Repeat the word 'cat' twenty times."}]
    plain = create(client, messages=ask, temperature=0, max_tokens=40)
    penalized = create(
        client, messages=ask, temperature=0, max_tokens=40, frequency_penalty=2, presence_penalty=2
    )
    count = lambda body: body["choices"][0]["message"]["content"].lower().count("cat")  # noqa: E731
    assert count(penalized) < count(plain)


def test_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    body = create(
        client, messages=FRANCE, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    tokens = body["choices"][0]["logprobs"]["content"]
    assert len(tokens) == body["usage"]["completion_tokens"]
    for token in tokens:
        assert token["logprob"] <= 0
        assert bytes(token["bytes"]).decode("utf-8", "replace") == token["token"]
        assert len(token["top_logprobs"]) == 3
        assert token["top_logprobs"][0]["logprob"] >= token["top_logprobs"][-1]["logprob"]
    assert "".join(t["token"] for t in tokens) == body["choices"][0]["message"]["content"]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    ask = {"messages": [{"role": "user", "content": "Invent a name for a cat."}], "max_tokens": 16}
    one = create(client, seed=1234, temperature=1.5, n=2, **ask)
    two = create(client, seed=1234, temperature=1.5, n=2, **ask)
    other = create(client, seed=99, temperature=1.5, n=2, **ask)
    texts = lambda body: [c["message"]["content"] for c in body["choices"]]  # noqa: E731
    assert texts(one) == texts(two)
    assert texts(one) != texts(other)


def test_json_object_and_json_schema(client: openai.OpenAI) -> None:
    ask = [
        {
            "role": "user",
            "content": 'Answer in JSON with the keys "city" and "country": '
            "what is the capital of France?",
        }
    ]
    body = create(
        client,
        messages=ask,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=300,
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    body = create(
        client,
        messages=ask,
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    value = json.loads(body["choices"][0]["message"]["content"])
    assert set(value) == {"city", "country"}
    assert isinstance(value["city"], str) and isinstance(value["country"], str)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    class City(pydantic.BaseModel):
        name: str
        country: str

    parsed = client.chat.completions.parse(
        model=MODEL, messages=FRANCE, response_format=City, max_tokens=100
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country


def test_developer_message_acts_as_system(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Who are you?"}]
    system = create(
        client,
        messages=[{"role": "system", "content": "You are Captain Nemo."}, *ask],
        temperature=0,
        max_tokens=20,
    )
    developer = create(
        client,
        messages=[{"role": "developer", "content": "You are Captain Nemo."}, *ask],
        temperature=0,
        max_tokens=20,
    )
    assert (
        developer["choices"][0]["message"]["content"] == system["choices"][0]["message"]["content"]
    )


def test_prediction_is_accepted_and_reported_as_zero(client: openai.OpenAI) -> None:
    body = create(
        client,
        messages=FRANCE,
        max_tokens=8,
        prediction={"type": "content", "content": "The capital of France is Paris."},
    )
    details = body["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == 0
    assert details["rejected_prediction_tokens"] == 0


def test_stream_in_openai_chunk_format(client: openai.OpenAI, db: Engine) -> None:
    chunks = stream(client, messages=FRANCE, stream_options={"include_usage": True}, store=True)
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in content
    choice_chunks = [c for c in chunks if c["choices"]]
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0

    # The job's stored result is the same answer, assembled.
    with db.connect() as conn:
        row = conn.execute(
            text("SELECT status, response FROM jobs WHERE id = :id"), {"id": ids.pop()}
        ).one()
    assert row.status == "succeeded"
    assert row.response["choices"][0]["message"]["content"] == content
    assert row.response["usage"] == last["usage"]


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = stream(client, messages=FRANCE, max_tokens=4)
    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk or chunk["usage"] is None for chunk in chunks)


def test_stream_with_n_and_the_sdk(client: openai.OpenAI) -> None:
    events = client.chat.completions.create(
        model=MODEL, messages=FRANCE, n=2, max_tokens=6, temperature=1, seed=3, stream=True
    )
    texts = {0: "", 1: ""}
    finished = set()
    for event in events:
        for choice in event.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())


def test_stream_error_before_first_token_is_an_http_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 5000}], stream=True
        )
    assert caught.value.code == "context_length_exceeded"
    validate("ErrorResponse", caught.value.response.json())


def test_first_token_arrives_long_before_the_last(client: openai.OpenAI) -> None:
    started = time.perf_counter()
    arrivals = []
    for event in client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
        max_tokens=120,
        temperature=0,
        stream=True,
    ):
        if event.choices and event.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 20
    # Tokens arrive spread over the generation, not all at once at its end.
    assert arrivals[0] < arrivals[-1] / 2


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# One worked example in the history, and the 135M model calls the tool itself.
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in London?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "London"}'},
            }
        ],
    },
    {"role": "user", "content": "What is the weather in Paris?"},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def the_call(body: dict) -> tuple[str, dict]:
    calls = body["choices"][0]["message"]["tool_calls"]
    assert calls[0]["id"] and calls[0]["type"] == "function"
    return calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])


def test_tool_choice_auto_parses_the_models_call(client: openai.OpenAI) -> None:
    body = create(client, messages=FEW_SHOT, tools=[WEATHER], tool_choice="auto", temperature=0)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert the_call(body) == ("get_weather", {"city": "Paris"})


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    body = create(
        client,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1
    name, arguments = the_call(body)
    assert name == "get_weather" and isinstance(arguments["city"], str)

    named = create(
        client,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    assert the_call(named)[0] == "get_weather"


def test_tool_choice_none_answers_in_words(client: openai.OpenAI) -> None:
    body = create(
        client,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=64,
    )
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_deprecated_functions_answer_in_the_old_shape(client: openai.OpenAI) -> None:
    body = create(
        client,
        messages=ASK_WEATHER,
        functions=[WEATHER["function"]],
        function_call={"name": "get_weather"},
        temperature=0,
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert isinstance(json.loads(choice["message"]["function_call"]["arguments"]), dict)


def test_streamed_tool_calls(client: openai.OpenAI) -> None:
    chunks = stream(client, messages=FEW_SHOT, tools=[WEATHER], tool_choice="auto", temperature=0)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not "".join(d.get("content") or "" for d in deltas).strip()
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(call.get("function", {}).get("arguments") or "" for call in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_result_turn_is_answered(client: openai.OpenAI) -> None:
    history = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "cloudy, 12 C"},
    ]
    body = create(client, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert body["choices"][0]["message"]["content"]


def test_client_that_disconnects_loses_no_stored_result(live_worker, api_key, db: Engine) -> None:
    import httpx

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
        "store": True,
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream(
        "POST", f"{live_worker.base_url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    job_id = json.loads(first[len("data: ") :])["id"]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with db.connect() as conn:
            row = conn.execute(
                text("SELECT status, response FROM jobs WHERE id = :id"), {"id": job_id}
            ).one()
        if row.status == "succeeded":
            break
        time.sleep(0.5)
    assert row.status == "succeeded"
    assert row.response["usage"]["completion_tokens"] == 120
    assert len(row.response["choices"][0]["message"]["content"]) > 100
