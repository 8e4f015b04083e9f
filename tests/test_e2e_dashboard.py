"""The dashboard opened in real headless Chromium (Debian's package) while a batch runs: it shows
the batch with its progress bar and the live worker with its model; a screenshot is kept at
test-artifacts/dashboard.png."""

import io
import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from bench.stack import Stack
from core.queue import WORKERS_KEY, live_beats
from tests.conftest import MODEL

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        pytest.fail("headless Chromium is missing: `make browser` installs Debian's package")
    return found


def open_in_chromium(url: str, profile: Path, screenshot: Path) -> str:
    """The page's DOM once its scripts have run for a few (virtual) seconds; a screenshot too."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--virtual-time-budget=6000",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_page_is_served_and_its_data_needs_a_key(stack: Stack, http: httpx.Client) -> None:
    page = httpx.get(f"{stack.base_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http://" not in page.text.replace("http://www.w3.org", "")
    for path in ("workers", "batches", "throughput"):
        assert httpx.get(f"{stack.base_url}/v1/dashboard/{path}").status_code == 401
        assert http.get(f"/v1/dashboard/{path}").status_code == 200
    throughput = http.get("/v1/dashboard/throughput", params={"minutes": 10, "bucket": 10}).json()
    assert len(throughput["buckets"]) == 60
    starts = [b["start"] for b in throughput["buckets"]]
    assert starts == sorted(starts) and starts[1] - starts[0] == 10
    assert http.get("/v1/dashboard/throughput", params={"minutes": 0}).status_code == 400


@pytest.mark.e2e
def test_dashboard_shows_a_running_batch_in_chromium(
    client: openai.OpenAI, live_worker: Stack, api_key: str, tmp_path: Path
) -> None:
    chromium()
    # 32 short answers end first; 8 long ones keep the batch running for a minute or more
    # (the batch is cancelled once the page has been read).
    lines = [
        json.dumps(
            {
                "custom_id": f"d-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Write a long story about the sea."}],
                    "max_tokens": 8 + i if i < 32 else 1500,
                },
            }
        )
        for i in range(40)
    ]
    file = client.files.create(
        file=("dashboard.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    try:
        # Some lines done, most still to run.
        deadline = time.monotonic() + 180
        current = client.batches.retrieve(batch.id)
        while current.request_counts.completed < 3:
            assert current.status in ("validating", "in_progress"), current.status
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.2)
            current = client.batches.retrieve(batch.id)
        assert current.status == "in_progress"

        screenshot = live_worker.log_dir / "dashboard.png"
        screenshot.unlink(missing_ok=True)
        dom = open_in_chromium(
            f"{live_worker.base_url}/dashboard#key={api_key}", tmp_path / "profile", screenshot
        )
        (live_worker.log_dir / "dashboard.html").write_text(dom)
    finally:
        client.batches.cancel(batch.id)

    # The batch, with a progress bar that says how far it is.
    found = re.search(
        rf'<div class="batch" id="batch-{re.escape(batch.id)}".*?</div>\s*</div>', dom, re.S
    )
    assert found, "the running batch is not on the page"
    row = found.group(0)
    bar = re.search(r'role="progressbar"[^>]*aria-valuemax="(\d+)"[^>]*aria-valuenow="(\d+)"', row)
    assert bar, row
    assert int(bar.group(1)) == 40 and 3 <= int(bar.group(2)) <= 32
    assert "in progress" in row and MODEL in row
    # The live worker and its model.
    beats, _ = live_beats(redis.Redis.from_url(live_worker.redis_url).hgetall(WORKERS_KEY), 15)
    assert beats
    for beat in beats:
        worker = re.search(rf'<tr data-worker-id="{re.escape(beat.worker_id)}".*?</tr>', dom, re.S)
        assert worker, f"worker {beat.worker_id} is not on the page"
        assert f'<td class="model">{beat.model}</td>' in worker.group(0)
    assert f'<tr data-model="{MODEL}">' in dom
    assert 'id="status">live<' in dom
    # The throughput chart: one bar per 10 s over 10 minutes.
    assert dom.count('class="bucket') == 60
    width, height = png_size(screenshot)
    assert (width, height) == (1280, 900) and screenshot.stat().st_size > 20_000
