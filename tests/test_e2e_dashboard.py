"""The dashboard opened in real headless Chromium (Debian's package) while a batch runs: it shows
the batch with its progress bar and the live worker with its model; a screenshot is kept at
test-artifacts/dashboard.png. Its throughput figure is the sum of its chart's last minute."""

import io
import json
import math
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
from sqlalchemy import Engine, text

from bench.stack import Stack
from core.queue import WORKERS_KEY, live_beats
from tests.conftest import MODEL
from workers.self_check import DEFAULT_CHECKS

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


def throughput_in_dom(dom: str) -> tuple[float, list[int], list[bool]]:
    """The page's output tokens/s figure, its chart's bars (output tokens, oldest first) and, per
    bar, whether the page draws it as one of the last minute's."""
    tps = re.search(r'<b id="tps">([\d,.]+)</b>', dom)
    assert tps, "no tokens/s figure on the page"
    bars = re.findall(r'<rect class="bucket( minute)?"[^>]*data-output-tokens="(\d+)"', dom)
    return (
        float(tps.group(1).replace(",", "")),
        [int(tokens) for _, tokens in bars],
        [bool(minute) for minute, _ in bars],
    )


def assert_the_figure_is_the_charts_last_minute(dom: str) -> int:
    """The tokens/s figure is the sum of the chart's last six bars over 60 s; that sum."""
    tps, bars, minute = throughput_in_dom(dom)
    assert len(bars) == 60 and minute == [False] * 54 + [True] * 6, minute
    assert 'id="tps-span">last minute<' in dom
    assert tps == pytest.approx(sum(bars[-6:]) / 60, abs=0.05), (tps, bars[-7:])
    return sum(bars[-6:])


def finish_jobs(db: Engine, name: str, count: int, tokens: int, seconds_ago: float) -> list[float]:
    """`count` jobs of the suite's key, ids `name`-1.., that ended `seconds_ago`, stored in one
    statement as a worker stores a batch's results; the Unix times they ended at."""
    with db.begin() as conn:
        rows = conn.execute(
            text(
                "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
                " created, completion_tokens, finished_at)"
                " SELECT :name || '-' || n, k.project, k.id, :model, 'succeeded', false, 1,"
                " extract(epoch from now())::bigint, :tokens,"
                " now() - make_interval(secs => :seconds_ago)"
                " FROM (SELECT project, id FROM api_keys WHERE name = 'suite' LIMIT 1) AS k,"
                " generate_series(1, :count) AS n"
                " RETURNING extract(epoch from finished_at)"
            ),
            {
                "name": name,
                "model": MODEL,
                "tokens": tokens,
                "seconds_ago": seconds_ago,
                "count": count,
            },
        )
        return [float(at) for (at,) in rows]


def test_tokens_per_second_is_the_sum_of_the_charts_last_minute(
    stack: Stack, http: httpx.Client, db: Engine, api_key: str, tmp_path: Path
) -> None:
    # What was seen during a batch: 8 long answers ended together (12,000 tokens in the chart's
    # last bar) while the figure beside the chart, which left that bar out, read 5.9 tokens/s.
    ids = f"chatcmpl-kpi{time.time_ns()}"
    try:
        ended = {
            "bulk": (1500, finish_jobs(db, f"{ids}-bulk", 8, 1500, 2)),
            "recent": (300, finish_jobs(db, f"{ids}-recent", 1, 300, 20)),
            "older": (7000, finish_jobs(db, f"{ids}-older", 1, 7000, 65)),
            "gone": (1_000_000, finish_jobs(db, f"{ids}-gone", 1, 1_000_000, 700)),
        }
        data = http.get("/v1/dashboard/throughput", params={"minutes": 10, "bucket": 10}).json()
        now, buckets = data["now"], data["buckets"]
        # Whole buckets that end at the server's clock: none is still filling.
        assert [b["start"] for b in buckets] == list(range(now - 600, now, 10))
        # Each job in the bucket of the time it ended (others' jobs may share it).
        least = [0] * 60
        for tokens, times in ended.values():
            for at in times:
                if now - 600 < at <= now:
                    least[59 - math.floor((now - at) / 10)] += tokens
        assert all(b["output_tokens"] >= n for b, n in zip(buckets, least, strict=True)), least
        assert sum(least[-6:]) == 8 * 1500 + 300 and sum(least[:-6]) == 7000
        # The figures are the sums of those same buckets: the last six, and all of them.
        minute = data["last_minute"]
        assert (minute["buckets"], minute["seconds"]) == (6, 60)
        assert minute["output_tokens"] == sum(b["output_tokens"] for b in buckets[-6:]) >= 12_300
        assert minute["completions"] == sum(b["completions"] for b in buckets[-6:]) >= 9
        assert minute["output_tokens_per_second"] == minute["output_tokens"] / 60
        total = data["total"]
        assert total["seconds"] == 600
        assert total["output_tokens"] == sum(b["output_tokens"] for b in buckets) < 1_000_000
        assert total["completions"] == sum(b["completions"] for b in buckets) >= 10

        # The page shows those figures, and marks the bars they come from.
        dom = open_in_chromium(
            f"{stack.base_url}/dashboard#key={api_key}", tmp_path / "profile", tmp_path / "page.png"
        )
        assert assert_the_figure_is_the_charts_last_minute(dom) >= 12_300
    finally:
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id LIKE :ids"), {"ids": f"{ids}-%"})


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
        # Its engine's self-check, on the shipped settings.
        checks = len(DEFAULT_CHECKS)
        assert f'<td class="self-check">passed: {checks} of {checks} ' in worker.group(0)
    assert f'<tr data-model="{MODEL}">' in dom
    assert 'id="status">live<' in dom
    # The throughput chart: one bar per 10 s over 10 minutes, and beside it the last minute's.
    assert dom.count('class="bucket') == 60
    assert_the_figure_is_the_charts_last_minute(dom)
    width, height = png_size(screenshot)
    assert (width, height) == (1280, 900) and screenshot.stat().st_size > 20_000
