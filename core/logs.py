"""Logging for every Ferry process: one JSON object a line (or plain text), with the ids of the
job and batch a line concerns as fields of their own.

    log.info("job %s cancelled", job_id, extra=job_fields(job_id, batch_id))
    {"ts": "2026-11-26T07:36:01.123Z", "level": "INFO", "logger": "workers.tasks",
     "message": "job chatcmpl-... cancelled", "job_id": "chatcmpl-...", "batch_id": "batch_..."}
"""

import json as jsonlib
import logging
import os
import time
from pathlib import Path
from typing import Any

# Everything a LogRecord carries of its own; any other attribute came in through `extra`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# uvicorn's access lines carry their parts as the message's arguments.
_ACCESS_LOGGER = "uvicorn.access"
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# vLLM configures its own loggers, in the worker and in each engine process it starts, from this
# file when VLLM_LOGGING_CONFIG_PATH names it: their lines come out in the same JSON.
VLLM_LOGGING_CONFIG = Path(__file__).with_name("vllm_logging.json")


def job_fields(job_id: str, batch_id: str | None = None, **more: Any) -> dict[str, Any]:
    """The `extra` of a log line about a job: its id, its batch's id if it has one, and `more`."""
    fields: dict[str, Any] = {"job_id": job_id}
    if batch_id is not None:
        fields["batch_id"] = batch_id
    fields.update(more)
    return fields


def batch_fields(batch_id: str, **more: Any) -> dict[str, Any]:
    """The `extra` of a log line about a batch."""
    return {"batch_id": batch_id, **more}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given through `extra` (and an access line's parts)."""
    fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}
    # vLLM's record factory names the process on every record of the worker; only an engine
    # process's own name (not the process's) says anything.
    if fields.get("vllm_process_name") == record.processName:
        del fields["vllm_process_name"]
    args = record.args
    if record.name == _ACCESS_LOGGER and isinstance(args, tuple) and len(args) == 5:
        fields.update(zip(_ACCESS_FIELDS, args, strict=True))
    return fields


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ts, level, logger, message, then its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with the extra fields after the message as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = extra_fields(record) if record.name != _ACCESS_LOGGER else {}
        return " ".join([text, *(f"{k}={v}" for k, v in fields.items())])


def configure(level: str | int = "INFO", json: bool = True) -> None:
    """Send every logger's lines to standard error through one JSON (or text) handler.

    Handlers installed before on the root logger are replaced; loggers that propagate (uvicorn's
    too, when it is given no logging config of its own) end up here, and vLLM, imported later,
    formats its own lines the same way. Call it before vLLM is imported.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    if json:
        os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # httpx tells of every request it sends at INFO: each webhook attempt, which Postgres records.
    logging.getLogger("httpx").setLevel(logging.WARNING if root.level >= logging.INFO else 0)
    logging.captureWarnings(True)  # Python's warnings too, as lines of logger py.warnings
