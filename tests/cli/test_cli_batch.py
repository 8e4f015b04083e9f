"""`ferry batch` against a fake OpenAI-compatible server: what it prints, writes and exits with."""

import _thread
import email.parser
import email.policy
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cli.main import main

KEY = "sk-test-batch"
CREATED_AT = 1714564800  # 2024-05-01 12:00:00 UTC
REQUESTS = [
    {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": f"say {custom_id}"}]},
    }
    for custom_id in ("req-1", "req-2", "req-bad")
]


def jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


class FakeOpenAI:
    """Files and Batches in memory; each GET of a batch moves it one step on."""

    def __init__(self) -> None:
        self.outcome = "completed"
        self.interrupt_at_poll: int | None = None
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.steps: dict[str, list[dict[str, Any]]] = {}
        self.polls = 0
        self.created: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def add_file(self, content: bytes, purpose: str, filename: str = "file.jsonl") -> str:
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = (
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": CREATED_AT,
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            },
            content,
        )
        return file_id

    def add_batch(self, **fields: Any) -> dict[str, Any]:
        batch = {
            "id": f"batch_{len(self.batches) + 1}",
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-0",
            "completion_window": "24h",
            "status": "validating",
            "created_at": CREATED_AT,
            "expires_at": CREATED_AT + 86400,
            "request_counts": {"completed": 0, "failed": 0, "total": 0},
            "metadata": None,
            "errors": None,
            "output_file_id": None,
            "error_file_id": None,
            **fields,
        }
        self.batches[batch["id"]] = batch
        self.steps[batch["id"]] = []
        return batch

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        _, content = self.files[body["input_file_id"]]
        lines = [json.loads(line) for line in content.splitlines() if line.strip()]
        batch = self.add_batch(
            input_file_id=body["input_file_id"],
            endpoint=body["endpoint"],
            completion_window=body["completion_window"],
            metadata=body.get("metadata"),
        )
        total = len(lines)
        if self.outcome == "failed":
            errors = {
                "object": "list",
                "data": [{"code": "invalid_url", "line": 2, "message": "url must be chat"}],
            }
            self.steps[batch["id"]] = [
                {"status": "failed", "failed_at": CREATED_AT + 5, "errors": errors}
            ]
            return batch
        good = [line for line in lines if "bad" not in line["custom_id"]]
        bad = [line for line in lines if "bad" in line["custom_id"]]
        output_id = self.add_file(
            jsonl(
                {"custom_id": line["custom_id"], "response": {"status_code": 200}} for line in good
            ),
            "batch_output",
        )
        error_id = self.add_file(
            jsonl({"custom_id": line["custom_id"], "error": {"code": "boom"}} for line in bad),
            "batch_output",
        )

        def counts(completed: int, failed: int) -> dict[str, int]:
            return {"completed": completed, "failed": failed, "total": total}

        self.steps[batch["id"]] = [
            {"status": "in_progress", "in_progress_at": CREATED_AT + 1},
            {"request_counts": counts(1, 0)},
            {"request_counts": counts(len(good), len(bad))},
            {"status": "finalizing", "finalizing_at": CREATED_AT + 3},
            {
                "status": "completed",
                "completed_at": CREATED_AT + 4,
                "output_file_id": output_id,
                "error_file_id": error_id,
            },
        ]
        return batch

    def poll(self, batch_id: str) -> dict[str, Any]:
        self.polls += 1
        if self.polls == self.interrupt_at_poll:
            _thread.interrupt_main()  # Ctrl-C in the CLI's (the test's) thread
        batch = self.batches[batch_id]
        if self.steps[batch_id]:
            batch.update(self.steps[batch_id].pop(0))
        return batch


def make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def not_found(self) -> None:
            error = {"message": f"no route {self.path}", "type": "invalid_request_error"}
            self.send(404, {"error": error})

        def authorized(self) -> bool:
            with fake.lock:
                fake.requests.append(f"{self.command} {self.path}")
            if self.headers.get("Authorization") == f"Bearer {KEY}":
                return True
            error = {"message": "Incorrect API key provided", "code": "invalid_api_key"}
            self.send(401, {"error": {**error, "type": "invalid_request_error"}})
            return False

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self) -> None:
            if not self.authorized():
                return
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            with fake.lock:
                if parts == ["v1", "batches"]:
                    limit = int(parse_qs(url.query).get("limit", ["20"])[0])
                    batches = sorted(fake.batches.values(), key=lambda b: b["id"], reverse=True)
                    page = batches[:limit]
                    self.send(
                        200,
                        {
                            "object": "list",
                            "data": page,
                            "first_id": page[0]["id"] if page else None,
                            "last_id": page[-1]["id"] if page else None,
                            "has_more": len(batches) > limit,
                        },
                    )
                elif parts[:2] == ["v1", "batches"] and parts[2] in fake.batches:
                    self.send(200, fake.poll(parts[2]))
                elif parts[:2] == ["v1", "files"] and parts[3:] == ["content"]:
                    self.send(200, fake.files[parts[2]][1], "application/octet-stream")
                else:
                    self.not_found()

        def do_POST(self) -> None:
            if not self.authorized():
                return
            parts = self.path.strip("/").split("/")
            body = self.body()
            with fake.lock:
                if parts == ["v1", "files"]:
                    head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        head + body
                    )
                    fields = {
                        part.get_param("name", header="content-disposition"): part
                        for part in message.iter_parts()
                    }
                    purpose = fields["purpose"].get_payload(decode=True).decode()
                    upload = fields["file"]
                    file_id = fake.add_file(
                        upload.get_payload(decode=True), purpose, upload.get_filename()
                    )
                    self.send(200, fake.files[file_id][0])
                elif parts == ["v1", "batches"]:
                    self.send(200, fake.create_batch(json.loads(body)))
                elif parts[:2] == ["v1", "batches"] and parts[3:] == ["cancel"]:
                    batch = fake.batches[parts[2]]
                    batch.update(status="cancelling", cancelling_at=CREATED_AT + 9)
                    self.send(200, batch)
                else:
                    self.not_found()

    return Handler


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """The fake API on 127.0.0.1, found through OPENAI_BASE_URL and OPENAI_API_KEY."""
    state = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC, so printed times are known."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for request in REQUESTS))
    return path


def ferry(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `ferry ARGS`; its exit code, stdout and stderr."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_uploads_the_file_as_is_and_prints_the_batch_id_last(
    fake: FakeOpenAI, requests_file: Path, capsys: pytest.CaptureFixture[str]
):
    code, out, _ = ferry(
        capsys, "batch", "submit", str(requests_file), "--metadata", "job=nightly", "team=ml"
    )
    assert code == 0
    batch_id = out.strip().splitlines()[-1]
    assert batch_id == "batch_1"
    info, content = fake.files["file-1"]
    assert content == requests_file.read_bytes()
    assert info["purpose"] == "batch"
    assert fake.created == [
        {
            "input_file_id": "file-1",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"job": "nightly", "team": "ml"},
        }
    ]
    assert not list(requests_file.parent.glob("*.output.jsonl"))


def test_submit_wait_downloads_output_and_errors_and_exits_0(
    fake: FakeOpenAI, requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    output, errors = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    code, out, _ = ferry(
        capsys,
        "batch",
        "submit",
        str(requests_file),
        "--output",
        str(output),
        "--errors",
        str(errors),
        "--poll",
        "0.01",
    )
    assert code == 0, out
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == [
        "req-1",
        "req-2",
    ]
    assert [json.loads(line)["custom_id"] for line in errors.read_text().splitlines()] == [
        "req-bad"
    ]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("completed: 2 completed, 1 failed, 3 total in ")
    assert str(output) in summary and str(errors) in summary
    assert "in_progress" in out
    assert not list(tmp_path.glob("*.part"))


def test_submit_wait_writes_results_beside_the_input_by_default(
    fake: FakeOpenAI, requests_file: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, _ = ferry(capsys, "batch", "submit", str(requests_file), "--wait", "--poll", "0.01")
    assert code == 0
    assert "req-1" in (requests_file.parent / "requests.output.jsonl").read_text()
    assert "req-bad" in (requests_file.parent / "requests.errors.jsonl").read_text()


def test_a_failed_batch_exits_1_and_prints_its_errors(
    fake: FakeOpenAI, requests_file: Path, capsys: pytest.CaptureFixture[str]
):
    fake.outcome = "failed"
    code, out, _ = ferry(capsys, "batch", "submit", str(requests_file), "--wait", "--poll", "0.01")
    assert code == 1
    assert "failed: 0 completed, 0 failed, 0 total" in out
    assert "line 2: invalid_url: url must be chat" in out
    assert not list(requests_file.parent.glob("requests.*.jsonl"))


def test_ctrl_c_while_waiting_says_how_to_check_later_and_exits_130(
    fake: FakeOpenAI, requests_file: Path, capsys: pytest.CaptureFixture[str]
):
    fake.interrupt_at_poll = 2
    code, out, _ = ferry(capsys, "batch", "submit", str(requests_file), "--wait", "--poll", "0.01")
    assert code == 130
    assert "ferry batch status batch_1" in out
    assert not list(requests_file.parent.glob("requests.*.jsonl"))


def test_submit_refuses_a_missing_or_empty_file_before_any_request(
    fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, err = ferry(capsys, "batch", "submit", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl: no such file" in err
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    code, _, err = ferry(capsys, "batch", "submit", str(empty))
    assert code == 2 and "empty.jsonl: the file is empty" in err
    assert fake.requests == []


def test_submit_refuses_an_output_in_a_missing_folder_before_uploading(
    fake: FakeOpenAI, requests_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    missing = tmp_path / "no" / "out.jsonl"
    code, _, err = ferry(capsys, "batch", "submit", str(requests_file), "--output", str(missing))
    assert code == 2 and "does not exist" in err
    assert fake.requests == []


def test_missing_api_key_is_a_clear_error(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.delenv("OPENAI_API_KEY")
    code, _, err = ferry(capsys, "batch", "list")
    assert code == 2
    assert "no API key" in err and "--api-key" in err and "OPENAI_API_KEY" in err
    assert "Traceback" not in err
    assert fake.requests == []


def test_options_override_the_environment_and_a_wrong_key_says_401(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    base_url = os.environ["OPENAI_BASE_URL"]
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    code, out, _ = ferry(capsys, "batch", "list", "--base-url", base_url, "--api-key", KEY)
    assert code == 0 and "no batches" in out
    code, _, err = ferry(capsys, "batch", "list", "--base-url", base_url, "--api-key", "sk-wrong")
    assert code == 1
    assert "HTTP 401: Incorrect API key provided" in err


def test_status_prints_counts_times_files_and_errors(
    fake: FakeOpenAI, utc: None, capsys: pytest.CaptureFixture[str]
):
    done = fake.add_batch(
        status="completed",
        request_counts={"completed": 98, "failed": 2, "total": 100},
        in_progress_at=CREATED_AT + 60,
        completed_at=CREATED_AT + 3600,
        input_file_id="file-in",
        output_file_id="file-out",
        error_file_id="file-err",
        metadata={"job": "nightly"},
    )
    code, out, _ = ferry(capsys, "batch", "status", done["id"])
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == [done["id"], "completed"]
    assert ["requests", "98", "completed,", "2", "failed,", "100", "total"] in lines
    assert ["created", "2024-05-01", "12:00:00", "UTC"] in lines
    assert ["in", "progress", "2024-05-01", "12:01:00", "UTC"] in lines
    assert ["completed", "2024-05-01", "13:00:00", "UTC"] in lines
    assert ["input", "file", "file-in"] in lines
    assert ["output", "file", "file-out"] in lines
    assert ["error", "file", "file-err"] in lines
    assert ["metadata", "job=nightly"] in lines

    failed = fake.add_batch(
        status="failed",
        failed_at=CREATED_AT + 5,
        errors={"data": [{"line": 7, "code": "invalid_json", "message": "not [json]"}]},
    )
    code, out, _ = ferry(capsys, "batch", "status", failed["id"])
    assert code == 0
    assert "line 7: invalid_json: not [json]" in out


def test_status_json_prints_the_batch_as_json(fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]):
    batch = fake.add_batch(status="in_progress", metadata={"a": "b"})
    code, out, _ = ferry(capsys, "batch", "status", batch["id"], "--json")
    assert code == 0
    printed = json.loads(out)
    assert printed["id"] == batch["id"]
    assert printed["status"] == "in_progress"
    assert printed["metadata"] == {"a": "b"}


def test_status_of_an_unknown_batch_says_404(fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]):
    code, _, err = ferry(capsys, "batch", "status", "batch_nope")
    assert code == 1 and "HTTP 404" in err


def test_cancel_prints_the_new_status(fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]):
    batch = fake.add_batch(status="in_progress")
    code, out, _ = ferry(capsys, "batch", "cancel", batch["id"])
    assert code == 0
    assert out.split() == [batch["id"], "cancelling"]
    assert fake.batches[batch["id"]]["status"] == "cancelling"


def test_list_prints_one_line_per_batch(
    fake: FakeOpenAI, utc: None, capsys: pytest.CaptureFixture[str]
):
    fake.add_batch(status="completed", request_counts={"completed": 9, "failed": 1, "total": 10})
    fake.add_batch(status="in_progress", metadata={"job": "nightly"})
    fake.add_batch(status="failed")
    code, out, _ = ferry(capsys, "batch", "list", "--limit", "2")
    assert code == 0
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert rows == [
        ["batch_3", "failed", "0/0/0", "2024-05-01", "12:00:00", "UTC"],
        ["batch_2", "in_progress", "0/0/0", "2024-05-01", "12:00:00", "UTC", "job=nightly"],
    ]
    code, out, _ = ferry(capsys, "batch", "list")
    assert out.strip().splitlines()[-1].split()[:3] == ["batch_1", "completed", "9/1/10"]
