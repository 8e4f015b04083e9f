"""The dashboard opened in real headless Chromium (Debian's package) while a batch runs: it shows
an admin key the batch with its progress bar and the live worker with its model; a screenshot is
kept at test-artifacts/dashboard.png. Its throughput figure is the sum of its chart's last minute.
An ordinary key sees its project's figures only, and no worker. The pages (the dashboard, /docs)
run under their Content-Security-Policy with nothing from another origin, the key lives in the
tab's session storage until "Forget key", and every response carries the security headers."""

import contextlib
import io
import json
import math
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from sqlalchemy import Engine, text
from websockets.sync.client import ClientConnection, connect

from api.app import create_app
from api.headers import page_policy
from api.routes.docs import VERSION as SWAGGER_UI
from bench.stack import Stack
from core.queue import WORKERS_KEY, live_beats
from core.settings import ApiSettings
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


# Run in each page before its own scripts: every Content-Security-Policy violation, kept.
RECORD_VIOLATIONS = """
window.violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.violations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


class Browser:
    """One page of headless Chromium, driven over the DevTools protocol: for what a dump of the
    DOM cannot show (storage, clicks, policy violations, what the page fetched)."""

    def __init__(self, profile: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, "Chromium exited at start"
            assert time.monotonic() < deadline, "Chromium's DevTools did not open"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        self.exits = contextlib.ExitStack()
        self.ws: ClientConnection = self.exits.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None)
        )
        self.calls = 0
        self.call("Page.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def eval(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 30) -> Any:
        deadline = time.monotonic() + seconds
        while not (found := self.eval(expression)):
            assert time.monotonic() < deadline, f"still not {expression} after {seconds:g} s"
            time.sleep(0.2)
        return found

    def open(self, url: str) -> None:
        """Load `url` and wait for its load event (not the previous page's)."""
        self.eval("window.left = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.left && document.readyState === 'complete' && !!window.violations")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.exits.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium()
    page = Browser(tmp_path / "devtools-profile")
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def admin_key(stack: Stack) -> str:
    """An admin key in the suite's project."""
    out = stack.ferry("keys", "create", "dashboard-admin", "--admin")
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stranger(stack: Stack) -> tuple[str, str]:
    """An ordinary key of a project of its own, which has nothing yet; (key, project)."""
    project = f"stranger-{uuid.uuid4().hex[:8]}"
    return stack.create_key("dashboard-stranger", project), project


def as_key(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


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
    # Shown to one decimal: within half of one, and a hair for the float (222.95 shows 223.0).
    assert tps == pytest.approx(sum(bars[-6:]) / 60, abs=0.05 + 1e-9), (tps, bars[-7:])
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
    assert "https://" not in page.text and "localStorage.setItem" not in page.text
    policy = page.headers["content-security-policy"]
    assert policy == page_policy(page.text) and "unsafe" not in policy
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
    client: openai.OpenAI, live_worker: Stack, admin_key: str, tmp_path: Path
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
        # An admin key of the batch's project: the batch, and the workers too.
        dom = open_in_chromium(
            f"{live_worker.base_url}/dashboard#key={admin_key}", tmp_path / "profile", screenshot
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
    assert 'id="status">live<' in dom and 'id="scope">admin: every project<' in dom
    # Every project's row; the batch's project has its lines queued or running, and the
    # tokens of those that ended.
    projects = dict(re.findall(r'<tr data-project="([^"]+)">(.*?)</tr>', dom, re.S))
    assert "default" in projects and 'id="projects-scope">every project<' in dom

    def cell(row: str, name: str) -> int:
        found = re.search(rf'<td class="num {name}[^"]*"[^>]*>([\d,]+)</td>', row)
        assert found, (name, row)
        return int(found.group(1).replace(",", ""))

    row = projects["default"]
    assert 1 <= cell(row, "queued-batch") + cell(row, "running-batch") <= 40 - 3
    assert cell(row, "tokens-completion") > 0 and cell(row, "tokens-prompt") > 0
    assert cell(row, "throttled-last-hour") <= cell(row, "throttled-total")
    # The throughput chart: one bar per 10 s over 10 minutes, and beside it the last minute's.
    assert dom.count('class="bucket') == 60
    assert_the_figure_is_the_charts_last_minute(dom)
    width, height = png_size(screenshot)
    assert (width, height) == (1280, 900) and screenshot.stat().st_size > 20_000


def queue_jobs(db: Engine, name: str, count: int) -> None:
    """`count` queued jobs of the suite's key, ids `name`-1..; no message is sent for them, and
    the reconciler leaves them be for an hour (it sends again only jobs queued a while ago)."""
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, project, api_key_id, model, status, store, attempts,"
                " created, queued_at)"
                " SELECT :name || '-' || n, k.project, k.id, :model, 'queued', false, 0,"
                " extract(epoch from now())::bigint, now() + interval '1 hour'"
                " FROM (SELECT project, id FROM api_keys WHERE name = 'suite' LIMIT 1) AS k,"
                " generate_series(1, :count) AS n"
            ),
            {"name": name, "model": MODEL, "count": count},
        )


@pytest.mark.e2e
def test_an_ordinary_key_sees_its_project_only(
    live_worker: Stack,
    http: httpx.Client,
    db: Engine,
    admin_key: str,
    stranger: tuple[str, str],
) -> None:
    ids = f"chatcmpl-scope{time.time_ns()}"
    beats, _ = live_beats(redis.Redis.from_url(live_worker.redis_url).hgetall(WORKERS_KEY), 15)
    assert beats
    try:
        # The suite's project: 5 jobs waiting for the model, 2 that ended 5 s ago.
        queue_jobs(db, f"{ids}-queued", 5)
        finish_jobs(db, f"{ids}-done", 2, 700, 5)
        key, project = stranger
        with as_key(live_worker, key) as other, as_key(live_worker, admin_key) as admin:
            # Another project's key: its own (empty) queues, no worker, no host, no pid.
            workers = other.get("/v1/dashboard/workers").json()
            assert workers["scope"] == "project" and workers["project"] == project
            assert "workers" not in workers
            shown = json.dumps(workers)
            for beat in beats:
                assert beat.hostname not in shown and beat.worker_id not in shown
            queue = {m["model"]: m for m in workers["models"]}[MODEL]
            assert (queue["queued"], queue["running"]) == (0, 0) and queue["workers"] >= 1
            assert all(set(f) == {"model", "at"} for f in workers["refused"])
            assert other.get("/v1/dashboard/batches").json()["data"] == []
            throughput = other.get("/v1/dashboard/throughput").json()
            assert throughput["scope"] == "project"
            assert throughput["total"]["output_tokens"] == throughput["total"]["completions"] == 0

            # The suite's own key: its project's queue and throughput.
            mine = http.get("/v1/dashboard/workers").json()
            assert mine["scope"] == "project" and "workers" not in mine
            assert {m["model"]: m for m in mine["models"]}[MODEL]["queued"] >= 5
            minute = http.get("/v1/dashboard/throughput").json()["last_minute"]
            assert minute["output_tokens"] >= 1400 and minute["completions"] >= 2

            # An admin key: every worker, with its host and pid, and every project's figures.
            fleet = admin.get("/v1/dashboard/workers").json()
            assert fleet["scope"] == "fleet"
            listed = {w["id"]: w for w in fleet["workers"]}
            for beat in beats:
                assert listed[beat.worker_id]["hostname"] == beat.hostname
                assert listed[beat.worker_id]["pid"] == beat.pid
            assert {m["model"]: m for m in fleet["models"]}[MODEL]["queued"] >= 5
            everyone = admin.get("/v1/dashboard/throughput").json()
            assert everyone["scope"] == "fleet"
            # The rows stored 5 s ago among them. (Read a moment after the project's figure, the
            # fleet's minute may have lost older jobs the project's still had: not compared.)
            assert everyone["last_minute"]["output_tokens"] >= 1400
            assert everyone["last_minute"]["completions"] >= 2
    finally:
        with db.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id LIKE :ids"), {"ids": f"{ids}-%"})


@pytest.mark.e2e
def test_an_ordinary_keys_page_keeps_the_key_in_the_tab_until_forgotten(
    live_worker: Stack, browser: Browser, stranger: tuple[str, str]
) -> None:
    key, project = stranger
    base = live_worker.base_url
    browser.open(f"{base}/dashboard#key={key}")
    browser.wait_for("document.getElementById('status').textContent === 'live'")
    # The key left the address bar for the tab's session storage; local storage holds nothing.
    assert browser.eval("location.hash") == ""
    assert browser.eval("sessionStorage.getItem('ferry.apiKey')") == key
    assert browser.eval("localStorage.length") == 0
    # The project's view: its queues, no workers table.
    assert browser.eval("document.getElementById('workers-card').hidden") is True
    assert browser.eval("document.querySelectorAll('#workers tr[data-worker-id]').length") == 0
    assert browser.eval("document.getElementById('scope').textContent") == f"project {project}"
    assert browser.eval(f"!!document.querySelector('#queues tr[data-model=\"{MODEL}\"]')")
    # Its project's row alone, with nothing queued, used or refused yet.
    shown = "[...document.querySelectorAll('#projects tr[data-project]')]"
    assert browser.eval(f"{shown}.map((r) => r.dataset.project)") == [project]
    assert browser.eval(f"{shown}.map((r) => r.textContent)") == [project + "0" * 9]
    # A reload keeps it (the same tab) ...
    browser.open(f"{base}/dashboard")
    browser.wait_for("document.getElementById('status').textContent === 'live'")
    # ... "Forget key" removes it at once, and a reload asks again.
    browser.eval("document.getElementById('forget-key').click()")
    assert browser.eval("sessionStorage.getItem('ferry.apiKey')") is None
    assert browser.eval("document.getElementById('board').hidden") is True
    assert browser.eval("document.getElementById('key-form').hidden") is False
    time.sleep(2.5)  # a refresh already on its way shows nothing
    assert browser.eval("document.getElementById('board').hidden") is True
    browser.open(f"{base}/dashboard")
    assert browser.eval("document.getElementById('key-form').hidden") is False
    assert browser.eval("document.getElementById('status').textContent") == "no API key"
    assert browser.eval("window.violations") == []


def test_a_key_left_in_local_storage_by_an_older_page_is_removed(
    stack: Stack, browser: Browser
) -> None:
    browser.open(f"{stack.base_url}/healthz")
    browser.eval("localStorage.setItem('ferry.apiKey', 'sk-ferry-old')")
    browser.open(f"{stack.base_url}/dashboard")
    assert browser.eval("localStorage.getItem('ferry.apiKey')") is None
    assert browser.eval("document.getElementById('key-form').hidden") is False


def test_docs_come_from_the_api_itself(stack: Stack, browser: Browser) -> None:
    base = stack.base_url
    page = httpx.get(f"{base}/docs")
    assert page.status_code == 200
    assert "https://" not in page.text and "http://" not in page.text
    policy = page.headers["content-security-policy"]
    assert policy == page_policy(page.text) and "unsafe" not in policy
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text):
        served = httpx.get(f"{base}{asset}")
        assert served.status_code == 200 and "immutable" in served.headers["cache-control"]
    assert httpx.get(f"{base}/docs/assets/{SWAGGER_UI}/index.html").status_code == 404
    assert httpx.get(f"{base}/redoc").status_code == 404

    browser.open(f"{base}/docs")
    # Swagger UI drew every operation of the document, under the page's policy.
    browser.wait_for("document.querySelectorAll('.opblock').length > 20")
    assert browser.eval("document.body.textContent.includes('/v1/chat/completions')")
    assert browser.eval("window.violations") == []
    fetched = browser.eval("performance.getEntriesByType('resource').map((e) => e.name)")
    assert fetched and all(url.startswith(f"{base}/") for url in fetched), fetched


def test_security_headers_on_every_response(stack: Stack, http: httpx.Client) -> None:
    answers = [
        http.get("/healthz"),
        http.get("/v1/models"),
        http.get("/v1/dashboard/throughput"),
        http.get("/openapi.json"),
        http.get("/no/such/path"),
        httpx.get(f"{stack.base_url}/v1/models"),  # 401 from the auth middleware
        httpx.get(f"{stack.base_url}/metrics"),
        httpx.get(f"{stack.base_url}/dashboard"),
        httpx.get(f"{stack.base_url}/docs"),
    ]
    for answer in answers:
        headers = answer.headers
        where = f"{answer.request.url.path} ({answer.status_code})"
        assert headers["x-content-type-options"] == "nosniff", where
        assert headers["x-frame-options"] == "DENY", where
        assert headers["referrer-policy"] == "no-referrer", where
        assert "frame-ancestors 'none'" in headers["content-security-policy"], where
    # Anything but a page may run nothing at all.
    assert answers[0].headers["content-security-policy"].startswith("default-src 'none';")
    assert "script-src" not in answers[1].headers["content-security-policy"]


def test_page_policy_allows_the_pages_own_inline_code_only() -> None:
    html = "<style>b { color: red; }</style><script>go();</script><script src='/x.js'></script>"
    policy = page_policy(html)
    # The SHA-256 of "go();" and of "b { color: red; }", base64, as browsers compute them.
    assert "script-src 'self' 'sha256-bYOqbsii8BMz1hC57p5sZG4K4cMuk6QQDiwupM2aRMM=';" in policy
    assert "style-src 'self' 'sha256-K7wBnJev2A/HN5dIkwuPGm8ZO0MR8u5EXZ0CyYxMWlc=';" in policy
    assert policy.count("'sha256-") == 2 and "unsafe" not in policy
    assert page_policy(html.replace("go()", "evil()")) != policy


def test_docs_can_be_turned_off() -> None:
    def paths(settings: ApiSettings) -> set[str]:
        return {getattr(route, "path", "") for route in create_app(settings).routes}

    assert {"/docs", "/openapi.json"} <= paths(ApiSettings(_env_file=None))
    off = paths(ApiSettings(_env_file=None, docs=False))
    assert "/docs" not in off and "/openapi.json" in off
    assert not {"/redoc", "/docs/oauth2-redirect"} & off
