"""Limits and bad input: each answers in OpenAI's envelope with its status and code, and leaves
nothing behind (no job, no file); a bad batch line fails alone.

The defaults are checked on the suite's API; a second API process with small limits shows that
each limit is its setting, and carries the batch test.
"""

import io
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack, free_port
from core.settings import ApiSettings, WorkerSettings
from tests.api.test_api_errors import URL, assert_envelope, count_jobs
from tests.conftest import MODEL
from tests.e2e.test_batches import read_jsonl, wait_until

DEFAULTS = ApiSettings.model_fields
CONTEXT = WorkerSettings.model_fields["max_model_len"].default
HI = [{"role": "user", "content": "hi"}]
SMALL = {
    "FERRY_MAX_REQUEST_BYTES": str(64 << 10),
    "FERRY_MAX_UPLOAD_BYTES": str(256 << 10),
    "FERRY_MAX_MESSAGES": "4",
    "FERRY_MAX_MESSAGES_CHARS": "100",
    "FERRY_MAX_JSON_DEPTH": "16",
    "FERRY_MAX_BATCH_LINE_BYTES": "4096",
}


def raw_request(port: int, head: bytes, body: Sequence[bytes] = ()) -> bytes:
    """Send `head`, then `body` from a thread while reading the answer: the server may answer
    (and close) before it has read the body, as a limit should."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)

        def send_body() -> None:
            try:
                for chunk in body:
                    sock.sendall(chunk)
            except OSError:
                pass  # the server stopped reading: what is being tested

        sender = threading.Thread(target=send_body)
        sender.start()
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
        sender.join()
    return answer


def parse_answer(answer: bytes) -> httpx.Response:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return httpx.Response(status, content=body, headers={"content-type": "application/json"})


def chunked(chunks: Sequence[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]


def post_head(port: int, key: str, path: str, content_type: str, framing: bytes) -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\n"
        ).encode()
        + framing
        + b"\r\n"
    )


def count_files(db: Engine) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM files")).scalar_one()


# --- The defaults, on the suite's API ---------------------------------------------------------


def test_body_over_the_limit_is_refused_by_its_content_length(
    stack: Stack, api_key: str, db: Engine
) -> None:
    before = count_jobs(db)
    limit = DEFAULTS["max_request_bytes"].default
    head = post_head(
        stack.port, api_key, URL, "application/json", b"Content-Length: %d\r\n" % (limit + 1)
    )
    started = time.monotonic()
    response = parse_answer(raw_request(stack.port, head))
    error = assert_envelope(response, 413, code="request_too_large")
    assert "16 MiB" in error["message"]
    # Answered at once, not after a body that never came.
    assert time.monotonic() - started < 5
    assert count_jobs(db) == before


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(
    stack: Stack, api_key: str, db: Engine
) -> None:
    before = count_jobs(db)
    limit = DEFAULTS["max_request_bytes"].default
    piece = b'{"padding": "' + b"x" * (1 << 20)
    head = post_head(
        stack.port, api_key, URL, "application/json", b"Transfer-Encoding: chunked\r\n"
    )
    answer = raw_request(stack.port, head, chunked([piece] * (limit // len(piece) + 8)))
    assert_envelope(parse_answer(answer), 413, code="request_too_large")
    assert count_jobs(db) == before


def test_malformed_utf8_is_400(http: httpx.Client, db: Engine) -> None:
    before = count_jobs(db)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "caf#"}]})
    response = http.post(
        URL,
        content=body.encode().replace(b"#", b"\xe9"),
        headers={"content-type": "application/json"},
    )
    error = assert_envelope(response, 400, code="invalid_encoding")
    assert "UTF-8" in error["message"]
    assert count_jobs(db) == before


@pytest.mark.parametrize("depth", [65, 900, 10_000])
def test_deeply_nested_json_is_400(http: httpx.Client, db: Engine, depth: int) -> None:
    before = count_jobs(db)
    nested = "[" * depth + "]" * depth
    body = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "x": {nested}}}'
    )
    response = http.post(URL, content=body.encode(), headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, code="nesting_too_deep")
    assert "64 levels" in error["message"]
    assert count_jobs(db) == before


def test_nesting_within_the_limit_is_read(http: httpx.Client) -> None:
    schema: dict = {"type": "string"}
    for _ in range(20):  # 40 levels in the schema, 45 in the body
        schema = {"type": "object", "properties": {"a": schema}}
    body = {
        "model": MODEL,
        "messages": HI,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "deep", "schema": schema},
        },
        "stream_options": {"include_usage": True},  # refused for its own reason, after parsing
    }
    assert_envelope(http.post(URL, json=body), 400, "stream_options", "invalid_value")


def test_too_many_messages_is_400(http: httpx.Client, db: Engine) -> None:
    before = count_jobs(db)
    most = DEFAULTS["max_messages"].default
    response = http.post(URL, json={"model": MODEL, "messages": HI * (most + 1)})
    error = assert_envelope(response, 400, "messages", "array_above_max_length")
    assert f"maximum length {most}" in error["message"]
    assert count_jobs(db) == before


def test_too_much_message_content_is_400(http: httpx.Client, db: Engine) -> None:
    before = count_jobs(db)
    most = DEFAULTS["max_messages_chars"].default
    half = "x" * (most // 2)
    messages = [{"role": "user", "content": half}, {"role": "user", "content": half + "y"}]
    response = http.post(URL, json={"model": MODEL, "messages": messages})
    error = assert_envelope(response, 400, "messages", "string_above_max_length")
    assert f"at most {most} characters" in error["message"]
    assert count_jobs(db) == before


@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800"])
def test_text_that_cannot_be_stored_is_400(http: httpx.Client, db: Engine, escape: str) -> None:
    before = count_jobs(db)
    content = json.dumps("a#b").replace("#", escape)
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {content}}}]}}'
    response = http.post(URL, content=body.encode(), headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, "messages[0].content", "invalid_value")
    assert "cannot be stored" in error["message"]
    assert count_jobs(db) == before


def test_nul_in_a_path_is_400_not_a_database_outage(http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/files/file-%00"), 400, code="invalid_value")
    assert_envelope(
        http.post("/v1/chat/completions/x", json={"metadata": {"k": "a\u0000"}}),
        400,
        "metadata.k",
        "invalid_value",
    )


# --- Each limit is its setting: a second API with small limits ------------------------------


@pytest.fixture(scope="module")
def small(stack: Stack) -> Iterator[str]:
    """The base URL of an API process with small limits, on the suite's data."""
    port = free_port()
    proc = stack.start_api_on(port, "api-small-limits", **SMALL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_settings_set_the_limits(small: str, api_key: str, db: Engine) -> None:
    before = count_jobs(db)
    sdk = openai.OpenAI(base_url=f"{small}/v1", api_key=api_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 70_000}]
        )
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=HI * 5)
    assert caught.value.code == "array_above_max_length"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 101}])
    assert caught.value.code == "string_above_max_length"
    deep = {"model": MODEL, "messages": HI, "x": [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]}
    response = httpx.post(
        f"{small}/v1/chat/completions", json=deep, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert_envelope(response, 400, code="nesting_too_deep")
    assert count_jobs(db) == before


def test_upload_limits(small: str, api_key: str, db: Engine) -> None:
    before = count_files(db)
    sdk = openai.OpenAI(base_url=f"{small}/v1", api_key=api_key, max_retries=0)
    limit = int(SMALL["FERRY_MAX_UPLOAD_BYTES"])
    # Just over the file limit, within the body's allowance for multipart framing: the upload
    # stops at the limit.
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.files.create(file=("big.jsonl", io.BytesIO(b"x" * (limit + 1))), purpose="batch")
    assert caught.value.status_code == 413
    assert caught.value.code == "file_too_large"
    assert caught.value.body["param"] == "file"
    # Far over, with its length declared: refused before it is read.
    port = int(small.rsplit(":", 1)[1])
    head = post_head(
        port,
        api_key,
        "/v1/files",
        "multipart/form-data; boundary=b",
        b"Content-Length: 9999999\r\n",
    )
    assert_envelope(parse_answer(raw_request(port, head)), 413, "file", "file_too_large")
    # Far over, chunked: refused as it arrives.
    head = post_head(
        port,
        api_key,
        "/v1/files",
        "multipart/form-data; boundary=b",
        b"Transfer-Encoding: chunked\r\n",
    )
    start = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    )
    answer = raw_request(port, head, chunked([start] + [b"{}\n" * 20_000] * 40))
    assert_envelope(parse_answer(answer), 413, "file", "file_too_large")
    assert count_files(db) == before
    # At the limit it is taken.
    ok = sdk.files.create(file=("ok.jsonl", io.BytesIO(b"x" * limit)), purpose="batch")
    assert ok.bytes == limit


@pytest.mark.e2e
def test_bad_batch_lines_fail_alone(small: str, api_key: str, live_worker: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{small}/v1", api_key=api_key, max_retries=0)

    def line(custom_id: str, content: str = "Say hi.", **extra) -> bytes:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": URL, "body": body, **extra}
        ).encode()

    lines = [
        line("good"),
        line("long", "x" * 5000),
        line("latin", "caf#").replace(b"#", b"\xe9"),
        line("deep", x=json.loads("[" * 20 + "]" * 20)),
        b'{"custom_id": "deeper", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        line("nul", "a\u0000b"),
        line("good-2"),
    ]
    upload = sdk.files.create(file=("in.jsonl", io.BytesIO(b"\n".join(lines))), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_until(sdk, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.total == len(lines)
    assert batch.request_counts.completed == 2
    assert batch.request_counts.failed == len(lines) - 2

    output = read_jsonl(sdk, batch.output_file_id)
    assert sorted(r["custom_id"] for r in output) == ["good", "good-2"]
    errors = {r["error"]["line"]: r for r in read_jsonl(sdk, batch.error_file_id)}
    assert {n: e["error"]["code"] for n, e in errors.items()} == {
        2: "line_too_long",
        3: "invalid_encoding",
        4: "nesting_too_deep",
        5: "nesting_too_deep",
        6: "invalid_value",
    }
    assert "4096 bytes" in errors[2]["error"]["message"]
    assert errors[6]["error"]["param"] == "body.messages[0].content"
    assert {n: e["custom_id"] for n, e in errors.items()} == {
        2: None,  # cut at the limit, its custom_id is not read
        3: "latin",
        4: "deep",
        5: None,  # too deep to read at all
        6: "nul",
    }


# --- max tokens and the context, through the real stack -------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_over_the_context_is_400(
    client: openai.OpenAI, field: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HI, stream=stream, **{field: CONTEXT + 1}
        )
    error = caught.value.body
    assert (error["param"], error["code"]) == (field, "invalid_value")
    assert f"{field} is too large: {CONTEXT + 1}" in error["message"]
    assert f"at most {CONTEXT} completion tokens" in error["message"]


def _prompt_tokens(client: openai.OpenAI, words: int) -> int:
    probe = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "word " * words}], max_tokens=1
    )
    assert probe.usage is not None
    return probe.usage.prompt_tokens


@pytest.mark.e2e
def test_max_tokens_past_the_room_left_is_cut_to_it(client: openai.OpenAI) -> None:
    words = CONTEXT - 60
    room = CONTEXT - _prompt_tokens(client, words)
    assert 0 < room < 60
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "word " * words}],
        max_completion_tokens=CONTEXT,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == room
    assert completion.usage.total_tokens == CONTEXT


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_that_fills_the_context_is_context_length_exceeded(
    client: openai.OpenAI, db: Engine, stream: bool
) -> None:
    words = CONTEXT - 60
    fill = words + CONTEXT - _prompt_tokens(client, words)  # one token of prompt per word
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "word " * fill}],
            max_tokens=5,
            stream=stream,
        )
    error = caught.value.body
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    # A stream's error reaches its client before the worker has stored the job's end.
    deadline = time.monotonic() + 10
    while True:
        with db.connect() as conn:
            row = conn.execute(
                text("SELECT status, error_status FROM jobs ORDER BY created_at DESC LIMIT 1")
            ).one()
        if row.status != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (row.status, row.error_status) == ("failed", 400)


@pytest.mark.e2e
def test_prompt_over_the_context_names_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * (CONTEXT + 10)}]
        )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")


# --- How the worker words vLLM's refusals (no stack needed) ----------------------------------


@pytest.mark.parametrize(
    ("message", "param", "expected"),
    [
        (
            f"max_completion_tokens={CONTEXT + 1} cannot be greater than max_model_len={CONTEXT}. "
            "Please request fewer output tokens.",
            "max_completion_tokens",
            ("max_completion_tokens", "invalid_value", "max_completion_tokens is too large"),
        ),
        (
            "max_tokens must be at least 1, got 0.",
            "max_tokens",
            ("messages", "context_length_exceeded", f"context length is {CONTEXT} tokens"),
        ),
        (
            f"This model's maximum context length is {CONTEXT} tokens. However, your prompt "
            "contains at least 2049 input tokens, which exceeds this limit.",
            "input_tokens",
            ("messages", "context_length_exceeded", "maximum context length"),
        ),
        ("top_logprobs must be at most 20.", "top_logprobs", ("top_logprobs", None, "at most 20")),
    ],
)
def test_engine_refusals_read_as_openai_words(message: str, param: str, expected: tuple) -> None:
    from workers.engine import engine_error

    error = engine_error(message, 400, param, CONTEXT)
    assert (error.status_code, error.type) == (400, "invalid_request_error")
    assert (error.param, error.code) == expected[:2]
    assert expected[2] in error.message
    server = engine_error("the engine failed", 500)
    assert (server.status_code, server.type, server.code) == (500, "server_error", "engine_error")
