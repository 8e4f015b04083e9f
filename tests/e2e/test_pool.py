"""No client holds the database pool: 60 slow file downloads, or 45 Idempotency-Key retries
waiting for their first job, while `/v1/models` and a chat completion answer as usual.

An API process has FERRY_DB_POOL_SIZE (20) connections and as many again on overflow: clients
that each kept one while they read or waited would leave nothing for anyone else after 40.
"""

import io
import json
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

DOWNLOADS = 60
RETRIES = 45
# Larger than what the kernel buffers on a loopback connection (tcp_wmem's 4 MiB at most), so
# that a reader who pauses leaves the download half-sent.
FILE_BYTES = 16 << 20
# What "normal time" allows on a shared CPU host; a request that waited for a pooled connection
# would take the pool's 30 s timeout, then fail.
MODELS_SECONDS = 5.0
COMPLETION_SECONDS = 15.0


def batch_file(size: int) -> bytes:
    """Valid batch input lines, `size` bytes or a little more."""
    lines = []
    total = i = 0
    while total < size:
        line = json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Say hi. " + "x" * 4000}],
                },
            }
        ).encode()
        lines.append(line + b"\n")
        total += len(line) + 1
        i += 1
    return b"".join(lines)


def slow_reader(port: int, path: str, api_key: str) -> socket.socket:
    """A GET of `path` from a client with a small receive buffer that reads nothing yet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Set before connecting, so that the window the server sees stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n\r\n"
    sock.sendall(head.encode())
    return sock


def read_to_end(sock: socket.socket, already: bytes) -> tuple[bytes, int]:
    """The response head and the body's length, reading what is left of `sock`'s response."""
    data = bytearray(already)
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    received = len(body)
    while received < length:
        chunk = sock.recv(1 << 20)
        assert chunk, f"the download ended after {received} of {length} bytes"
        received += len(chunk)
    return head, received


def answers_in_normal_time(http: httpx.Client, client: openai.OpenAI) -> tuple[float, float]:
    """Seconds `/v1/models` and a short chat completion took; both must succeed."""
    started = time.monotonic()
    models = http.get("/v1/models", timeout=60)
    models_took = time.monotonic() - started
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    started = time.monotonic()
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=2, timeout=60
    )
    completion_took = time.monotonic() - started
    assert completion.choices[0].message.content is not None
    return models_took, completion_took


@pytest.fixture
def slow_downloads(
    live_worker: Stack, client: openai.OpenAI, api_key: str
) -> Iterator[tuple[list[socket.socket], int]]:
    """DOWNLOADS downloads of one large file, each started, then left unread; and its size."""
    data = batch_file(FILE_BYTES)
    file = client.files.create(file=("large.jsonl", io.BytesIO(data)), purpose="batch")
    readers = [
        slow_reader(live_worker.port, f"/v1/files/{file.id}/content", api_key)
        for _ in range(DOWNLOADS)
    ]
    try:
        yield readers, len(data)
    finally:
        for sock in readers:
            sock.close()
        client.files.delete(file.id)


def test_slow_downloads_hold_no_connection(
    slow_downloads: tuple[list[socket.socket], int], http: httpx.Client, client: openai.OpenAI
) -> None:
    readers, size = slow_downloads
    # Each download has begun: its status line came, then its reader stopped reading.
    heads = [sock.recv(16) for sock in readers]
    assert all(head.startswith(b"HTTP/1.1 200") for head in heads), set(heads)

    models_took, completion_took = answers_in_normal_time(http, client)
    assert models_took < MODELS_SECONDS
    assert completion_took < COMPLETION_SECONDS

    # The downloads were still under way, and one read to its end now is whole.
    _, received = read_to_end(readers[0], heads[0])
    assert received == size


def test_idempotent_retries_wait_without_a_connection(
    live_worker: Stack, http: httpx.Client, client: openai.OpenAI, db: Engine
) -> None:
    key = f"pool-{uuid.uuid4().hex}"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
        "max_tokens": 1500,
        "temperature": 1.0,
        # No end of text: it runs its 1500 tokens, past the test, on a fast host too.
        "logit_bias": {"0": -100, "2": -100},
    }
    first = http.post(
        "/v1/chat/completions",
        json=body,
        headers={"Idempotency-Key": key, "Prefer": "respond-async"},
    )
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        if status == "running":
            break
        time.sleep(0.1)
    assert status == "running", status

    def retry() -> httpx.Response:
        with httpx.Client(
            base_url=live_worker.base_url, headers=dict(http.headers), timeout=120
        ) as own:
            return own.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(RETRIES) as pool:
        waiting = [pool.submit(retry) for _ in range(RETRIES)]
        time.sleep(3)  # every retry has reached the API and waits for the first job
        try:
            models_took, completion_took = answers_in_normal_time(http, client)
            # Still waiting: the first job has not ended.
            assert not any(future.done() for future in waiting)
        finally:
            cancelled = http.post(f"/v1/chat/completions/{job_id}/cancel")
        answers = [future.result(timeout=60) for future in waiting]
    assert cancelled.status_code == 200, cancelled.text
    assert models_took < MODELS_SECONDS
    assert completion_took < COMPLETION_SECONDS
    # Each retry was answered with the first job's outcome: it was cancelled.
    assert {(r.status_code, r.json()["error"]["code"]) for r in answers} == {(409, "cancelled")}
