"""Ingestion of a 50,000-line batch file: upload, validation and persistence of every line.

Run: `.venv/bin/python -m bench.batch_ingest`. It starts an API on its own database (no worker:
the jobs stay queued), uploads the file with the `openai` SDK, creates the batch, and reports
lines per second until every line is a job, and the API process's peak resident memory
(sampled every 50 ms) against its memory before the upload.
"""

import argparse
import io
import json
import threading
import time

import openai
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.stack import Stack
from core.settings import DEFAULT_MODEL


def make_file(lines: int) -> bytes:
    out = io.StringIO()
    for i in range(lines):
        body = {
            "model": DEFAULT_MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Summarise the number {i} in one sentence."},
            ],
            "max_tokens": 64,
            "temperature": 0,
            "metadata": {"line": str(i)},
        }
        record = {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.write(json.dumps({**record, "body": body}) + "\n")
    return out.getvalue().encode()


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()

    data = make_file(args.lines)
    stack = Stack(database="ferry_bench_ingest", redis_db=10)
    stack.reset()
    engine = create_engine(stack.database_url, poolclass=NullPool)
    try:
        key = stack.create_key("bench")
        with engine.begin() as conn:  # the model is known, as if a worker had served it
            conn.execute(text("INSERT INTO served_models (name) VALUES (:m)"), {"m": DEFAULT_MODEL})
        api = stack.start_api()
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        rss = PeakRss(api.pid)
        before = rss.peak
        rss.start()
        started = time.perf_counter()
        file = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
        uploaded = time.perf_counter()
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while (batch := client.batches.retrieve(batch.id)).status == "validating":
            time.sleep(0.1)
        done = time.perf_counter()
        rss.running = False
        with engine.connect() as conn:
            jobs = conn.execute(
                text("SELECT count(*) FROM jobs WHERE batch_id = :b"), {"b": batch.id}
            ).scalar_one()
    finally:
        stack.stop()
        engine.dispose()
        stack.drop_database()

    assert batch.status == "in_progress" and jobs == args.lines, (batch.status, jobs)
    mib = 1 << 20
    print(f"file: {args.lines:,} lines, {len(data) / mib:.1f} MiB")
    print(f"upload:               {uploaded - started:.2f} s")
    print(f"validate and persist: {done - uploaded:.2f} s ({jobs:,} jobs)")
    print(f"ingestion:            {args.lines / (done - started):,.0f} lines/s end to end")
    print(
        f"API memory:           {before / mib:.0f} MiB before, peak {rss.peak / mib:.0f} MiB "
        f"(+{(rss.peak - before) / mib:.0f} MiB for a {len(data) / mib:.0f} MiB file)"
    )


if __name__ == "__main__":
    main()
