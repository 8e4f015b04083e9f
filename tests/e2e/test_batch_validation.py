"""Validating a large batch file leaves the API responsive: the file is parsed in other processes,
and an API process validates at most FERRY_BATCH_VALIDATION_CONCURRENCY batches at once."""

import io
import statistics
import threading
import time

import httpx
import openai
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from core.settings import ApiSettings
from tests.conftest import MODEL
from tests.e2e.test_batches import line, read_jsonl, wait_until

pytestmark = pytest.mark.e2e

CONCURRENCY = ApiSettings.model_fields["batch_validation_concurrency"].default
FILLER = "The quick brown fox jumps over the lazy dog. " * 41


def lines_of(count: int, model: str, tag: str, filler: str = FILLER) -> list[bytes]:
    """`count` lines that parse and pass every check but the model's: they cost the validation
    all its work and the engine nothing."""
    return [
        line(f"{tag}-{i}", f"{i}. {filler}", model=model, max_tokens=1).encode()
        for i in range(count)
    ]


def upload(client: openai.OpenAI, lines: list[bytes]) -> str:
    data = b"\n".join(lines) + b"\n"
    return client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch").id


def test_healthz_stays_fast_while_100_mb_validates(client: openai.OpenAI, stack: Stack) -> None:
    # 49,995 lines for a model no worker serves and 5 that run: about 100 MB, all parsed and
    # checked, and almost nothing for the engine.
    lines = lines_of(49_995, "no-such-model", "big") + lines_of(5, MODEL, "run", "Say hi.")
    size = sum(len(x) + 1 for x in lines)
    assert size > 100_000_000
    file_id = upload(client, lines)
    del lines

    latencies: list[float] = []
    measuring = threading.Event()
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            while not done.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                if measuring.is_set():
                    latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        measuring.set()
        began = time.monotonic()
        while client.batches.retrieve(batch.id).status == "validating":
            time.sleep(0.2)
        measuring.clear()
        took = time.monotonic() - began
    finally:
        done.set()
        prober.join()

    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n{size / 1e6:.0f} MB validated in {took:.1f} s; /healthz meanwhile: ", end="")
    print(
        f"{len(latencies)} requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies):.0f}"
    )
    assert len(latencies) >= 100
    assert p99 < 50

    finished = wait_until(client, batch.id, {"completed", "failed"})
    assert finished.status == "completed"
    counts = finished.request_counts
    assert (counts.total, counts.completed, counts.failed) == (50_000, 5, 49_995)
    output = read_jsonl(client, finished.output_file_id)
    assert sorted(o["custom_id"] for o in output) == [f"run-{i}" for i in range(5)]


def test_an_api_process_validates_at_most_its_concurrency_at_once(
    client: openai.OpenAI, db: Engine
) -> None:
    files = [upload(client, lines_of(20_000, "no-such-model", f"c{n}", "Hi.")) for n in range(3)]
    batches = [
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for file_id in files
    ]
    # A batch waiting for its turn has no line read yet.
    most = 0
    deadline = time.monotonic() + 300
    while True:
        with db.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT b.status, (SELECT count(*) FROM batch_line_errors e"
                    " WHERE e.batch_id = b.id) FROM batches b WHERE b.id = ANY(:ids)"
                ),
                {"ids": batches},
            ).all()
        reading = sum(1 for status, read in rows if status == "validating" and read)
        most = max(most, reading)
        assert reading <= CONCURRENCY
        if all(status != "validating" for status, _ in rows):
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert most == CONCURRENCY
    for batch_id in batches:
        assert client.batches.retrieve(batch_id).status == "failed"  # no valid line
