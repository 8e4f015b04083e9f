"""core.logs: one JSON object a line, with a job's and a batch's ids as fields of their own."""

import io
import json
import logging
from collections.abc import Iterator

import pytest

from core import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger configured by core.logs, writing into a buffer; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("INFO", json=True)
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:], root.level = saved


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_job_line_is_json_with_its_ids(captured: io.StringIO) -> None:
    log = logging.getLogger("workers.tasks")
    log.info(
        "job %s done", "chatcmpl-1", extra=logs.job_fields("chatcmpl-1", "batch_9", worker="w@h")
    )
    (line,) = lines(captured)
    assert line["message"] == "job chatcmpl-1 done"
    assert line["job_id"] == "chatcmpl-1"
    assert line["batch_id"] == "batch_9"
    assert line["worker"] == "w@h"
    assert line["level"] == "INFO"
    assert line["logger"] == "workers.tasks"
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_lines_without_a_batch_or_extras_carry_no_such_keys(captured: io.StringIO) -> None:
    logging.getLogger("api").warning("job %s slow", "chatcmpl-2", extra=logs.job_fields("c-2"))
    logging.getLogger("api").warning("plain")
    job, plain = lines(captured)
    assert job["job_id"] == "c-2" and "batch_id" not in job
    assert set(plain) == {"ts", "level", "logger", "message"}


def test_exceptions_and_odd_values_stay_one_json_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"batch_id": "b", "when": object()})
    assert len(captured.getvalue().splitlines()) == 1
    (line,) = lines(captured)
    assert "ValueError: boom" in line["exc_info"]
    assert line["batch_id"] == "b" and line["when"].startswith("<object")


def test_uvicorn_access_lines_get_their_parts(captured: io.StringIO) -> None:
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/models", "1.1", 200)
    (line,) = lines(captured)
    assert line["message"] == '127.0.0.1:5000 - "GET /v1/models HTTP/1.1" 200'
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/models", 200)


def test_text_format_keeps_the_ids_readable() -> None:
    record = logging.makeLogRecord(
        {"name": "w", "levelname": "INFO", "msg": "job done", "job_id": "c-3", "batch_id": "b-1"}
    )
    text = logs.TextFormatter().format(record)
    assert text.endswith("INFO w: job done job_id=c-3 batch_id=b-1")


def test_vllm_is_pointed_at_a_config_with_the_same_formatter(
    captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging.config
    import os
    from pathlib import Path

    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "")  # restored to its own value afterwards
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH")
    logs.configure("INFO", json=True)
    config = json.loads(Path(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    assert config["formatters"]["ferry_json"]["()"] == "core.logs.JsonFormatter"
    vllm_logger = logging.getLogger("vllm")
    saved = vllm_logger.handlers[:], vllm_logger.propagate, vllm_logger.level
    try:
        logging.config.dictConfig(config)  # as vLLM applies it
        assert isinstance(vllm_logger.handlers[0].formatter, logs.JsonFormatter)
    finally:
        vllm_logger.handlers[:], vllm_logger.propagate = saved[0], saved[1]
        vllm_logger.setLevel(saved[2])
