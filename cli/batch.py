"""`ferry batch`: submit, watch, inspect, cancel and list batches on an OpenAI-compatible API.

Talks HTTP with the official SDK, so it works against any Ferry deployment (or OpenAI itself).
The input is the JSONL that `vllm run-batch` and OpenAI's Batch API accept, uploaded as is.
`openai` and `rich` are imported inside the functions so that `ferry` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    import openai
    from openai.types import Batch
    from rich.console import Console

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
ENDPOINT: Final = "/v1/chat/completions"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class BatchCliError(Exception):
    """A failure reported on one line, without a traceback, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- the client ------------------------------------------------------------------------------


def make_client(base_url: str | None = None, api_key: str | None = None) -> openai.OpenAI:
    """An SDK client for the given base URL and key, else OPENAI_BASE_URL and OPENAI_API_KEY."""
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        raise BatchCliError("no API key: pass --api-key or set OPENAI_API_KEY")
    url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    return openai.OpenAI(base_url=url, api_key=key)


def describe_api_error(exc: Exception, client: openai.OpenAI | None = None) -> str:
    """One line saying what went wrong talking to the API."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {exc.status_code}: {message or exc.message}"
    if isinstance(exc, openai.APIConnectionError):
        where = f" {client.base_url}" if client is not None else ""
        return f"cannot reach{where}: {exc}"
    return str(exc)


# -- formatting ------------------------------------------------------------------------------


def format_time(timestamp: int | None) -> str:
    """A Unix timestamp as local time, e.g. `2024-05-01 12:00:00 UTC`; `-` if unset."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def format_duration(seconds: float | None) -> str:
    """Seconds as `1h02m03s`, `2m03s` or `4.5s`; `-` if unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _counts(batch: Batch) -> tuple[int, int, int]:
    counts = batch.request_counts
    return (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)


def _metadata(batch: Batch) -> str:
    return " ".join(f"{key}={value}" for key, value in (batch.metadata or {}).items())


def _say(console: Console, *parts: str | tuple[str, str]) -> None:
    """Print one line, unwrapped, with no markup parsing (server text may hold brackets)."""
    from rich.text import Text

    console.print(Text.assemble(*parts), soft_wrap=True)


def _status_style(status: str) -> str:
    if status == "completed":
        return "bold green"
    if status in TERMINAL_STATUSES:
        return "bold red"
    return "bold yellow"


def print_errors(console: Console, batch: Batch) -> None:
    """Print a batch's errors (why it failed), one per line: line, code and message."""
    for error in (batch.errors.data or []) if batch.errors else []:
        where = f"line {error.line}" if error.line is not None else "batch"
        _say(console, f"  {where}: ", (error.code or "error", "red"), f": {error.message or ''}")


# -- submit ----------------------------------------------------------------------------------


def check_input(path: Path) -> None:
    """Refuse only obviously wrong input: a missing or empty file (the server checks lines)."""
    if not path.is_file():
        raise BatchCliError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise BatchCliError(f"{path}: the file is empty")


def default_result_path(input_path: Path, kind: str) -> Path:
    """Where results go by default: `requests.jsonl` -> `requests.output.jsonl` beside it."""
    return input_path.with_name(f"{input_path.stem}.{kind}.jsonl")


def submit(
    client: openai.OpenAI,
    console: Console,
    input_path: Path,
    *,
    wait: bool = False,
    output: Path | None = None,
    errors: Path | None = None,
    metadata: dict[str, str] | None = None,
    completion_window: str = "24h",
    poll: float = 1.0,
) -> int:
    """Upload a JSONL file and create its batch; with `wait`, follow it and download results."""
    import openai

    check_input(input_path)
    wait = wait or output is not None or errors is not None
    output = output or default_result_path(input_path, "output")
    errors = errors or default_result_path(input_path, "errors")
    if wait:
        for path in (output, errors):
            if not path.parent.is_dir():
                raise BatchCliError(f"{path}: the folder {path.parent} does not exist")
    if poll <= 0:
        raise BatchCliError("--poll must be a positive number of seconds")

    with input_path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    _say(console, f"uploaded {input_path} ({input_path.stat().st_size} bytes) as {uploaded.id}")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window=cast(Any, completion_window),
        metadata=metadata or openai.omit,
    )
    if not wait:
        console.print(batch.id, soft_wrap=True, highlight=False, markup=False)
        return 0

    _say(console, f"submitted {batch.id}; Ctrl-C stops waiting, not the batch")
    started = time.monotonic()
    try:
        batch = watch(client, console, batch, poll=poll)
        written = download_results(client, batch, output=output, errors=errors)
    except KeyboardInterrupt:
        _say(console, f"\nstopped waiting; {batch.id} goes on. Check it with:")
        _say(console, f"  ferry batch status {batch.id}")
        return EXIT_INTERRUPTED
    except openai.APIError as exc:
        raise BatchCliError(
            f"{describe_api_error(exc, client)}; check {batch.id} with `ferry batch status "
            f"{batch.id}`",
            exit_code=1,
        ) from exc

    completed, failed, total = _counts(batch)
    files = ", ".join(str(path) for path in written) or "no files"
    _say(
        console,
        (batch.status, _status_style(batch.status)),
        f": {completed} completed, {failed} failed, {total} total in "
        f"{format_duration(time.monotonic() - started)}; wrote {files}",
    )
    if batch.status == "failed":
        print_errors(console, batch)
    return 0 if batch.status == "completed" else 1


class _Rate:
    """Requests per second over the polls of the last `window` seconds."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        """Record how many requests are done at `now`; returns the current rate."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        then, done_then = self.samples[0]
        return (done - done_then) / (now - then) if now > then else 0.0


def watch(
    client: openai.OpenAI,
    console: Console,
    batch: Batch,
    *,
    poll: float = 1.0,
) -> Batch:
    """Poll a batch every `poll` seconds with a progress bar until it ends; returns it."""
    from rich.progress import BarColumn, Progress, TextColumn

    rate = _Rate()
    started = time.monotonic()
    columns = (TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(batch.status, total=None, info="")
        status = None
        while True:
            if batch.status != status:
                status = batch.status
                _say(progress.console, f"{format_time(int(time.time()))}  {status}")
            completed, failed, total = _counts(batch)
            done = completed + failed
            now = time.monotonic()
            per_second = rate.add(now, done)
            eta = (total - done) / per_second if per_second > 0 and total else None
            info = (
                f"{done}/{total or '?'} done",
                f"{failed} failed",
                f"{per_second:.1f} req/s",
                f"ETA {format_duration(eta)}",
                f"elapsed {format_duration(now - started)}",
            )
            progress.update(
                task,
                description=batch.status,
                total=total or None,
                completed=done,
                info=" · ".join(info),
                refresh=True,
            )
            if batch.status in TERMINAL_STATUSES:
                return batch
            time.sleep(poll)
            batch = client.batches.retrieve(batch.id)


def download(client: openai.OpenAI, file_id: str, path: Path) -> None:
    """Stream a file's content to `path`, through a `.part` file so no half file is left."""
    partial = path.with_name(path.name + ".part")
    try:
        with client.files.with_streaming_response.content(file_id) as response:
            response.stream_to_file(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def download_results(
    client: openai.OpenAI, batch: Batch, *, output: Path, errors: Path
) -> list[Path]:
    """Download the batch's output and error files, those it has; returns the paths written."""
    written = []
    for file_id, path in ((batch.output_file_id, output), (batch.error_file_id, errors)):
        if file_id:
            download(client, file_id, path)
            written.append(path)
    return written


# -- status, cancel, list --------------------------------------------------------------------


def status(client: openai.OpenAI, console: Console, batch_id: str, *, as_json: bool = False) -> int:
    """Print a batch: status, counts, times, files and errors; or its JSON."""
    batch = client.batches.retrieve(batch_id)
    if as_json:
        console.out(batch.to_json(indent=2), highlight=False)
        return 0
    completed, failed, total = _counts(batch)
    _say(console, f"{batch.id}  ", (batch.status, _status_style(batch.status)))
    rows: list[tuple[str, str | None]] = [
        ("requests", f"{completed} completed, {failed} failed, {total} total"),
        ("endpoint", batch.endpoint),
        ("window", batch.completion_window),
        ("model", batch.model),
        ("metadata", _metadata(batch) or None),
        ("created", format_time(batch.created_at)),
    ]
    for label in ("in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"):
        rows.append((label.replace("_", " "), _time_or_none(getattr(batch, f"{label}_at"))))
    if batch.expired_at:
        rows.append(("expired", _time_or_none(batch.expired_at)))
    elif batch.status not in TERMINAL_STATUSES:
        rows.append(("expires", _time_or_none(batch.expires_at)))
    rows += [
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id),
        ("error file", batch.error_file_id),
    ]
    for label, value in rows:
        if value:
            _say(console, f"  {label:<13}{value}")
    if batch.errors and batch.errors.data:
        _say(console, "  errors")
        print_errors(console, batch)
    return 0


def _time_or_none(timestamp: int | None) -> str | None:
    return format_time(timestamp) if timestamp else None


def cancel(client: openai.OpenAI, console: Console, batch_id: str) -> int:
    """Ask the server to cancel a batch; print its new status."""
    batch = client.batches.cancel(batch_id)
    _say(console, f"{batch.id}  ", (batch.status, _status_style(batch.status)))
    return 0


def list_batches(client: openai.OpenAI, console: Console, *, limit: int = 20) -> int:
    """Print the latest batches, one a line: id, status, counts, created time, metadata."""
    from itertools import islice

    batches = list(islice(client.batches.list(limit=min(limit, 100)), limit))
    if not batches:
        _say(console, "no batches")
        return 0
    rows = [
        (
            batch.id,
            batch.status,
            "/".join(str(n) for n in _counts(batch)),
            format_time(batch.created_at),
            _metadata(batch),
        )
        for batch in batches
    ]
    header = ("id", "status", "completed/failed/total", "created", "metadata")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(4)]
    for row in [header, *rows]:
        padded = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        _say(console, "  ".join([*padded, row[4]]).rstrip())
    return 0


# -- the command line ------------------------------------------------------------------------


def _metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _run(args: argparse.Namespace, action: Callable[[openai.OpenAI, Console], int]) -> None:
    """Build the client, run one command, report failures on one line; exit with its code."""
    import openai
    from rich.console import Console

    client = None
    try:
        client = make_client(args.base_url, args.api_key)
        code = action(client, Console())
    except (BatchCliError, openai.APIError) as exc:
        if isinstance(exc, BatchCliError):
            message, code = str(exc), exc.exit_code
        else:
            message, code = describe_api_error(exc, client), 1
        Console(stderr=True).print(
            f"ferry batch: {message}", markup=False, highlight=False, soft_wrap=True
        )
    if code:
        sys.exit(code)


def cmd_submit(args: argparse.Namespace) -> None:
    """`ferry batch submit`."""
    _run(
        args,
        lambda client, console: submit(
            client,
            console,
            Path(args.input),
            wait=args.wait,
            output=Path(args.output) if args.output else None,
            errors=Path(args.errors) if args.errors else None,
            metadata=dict(args.metadata or []),
            completion_window=args.completion_window,
            poll=args.poll,
        ),
    )


def cmd_status(args: argparse.Namespace) -> None:
    """`ferry batch status`."""
    _run(args, lambda client, console: status(client, console, args.id, as_json=args.json))


def cmd_cancel(args: argparse.Namespace) -> None:
    """`ferry batch cancel`."""
    _run(args, lambda client, console: cancel(client, console, args.id))


def cmd_list(args: argparse.Namespace) -> None:
    """`ferry batch list`."""
    _run(args, lambda client, console: list_batches(client, console, limit=args.limit))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def add_parser(sub: Any) -> None:
    """Register `ferry batch` and its subcommands on `ferry`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url", help=f"the API's base URL (default: OPENAI_BASE_URL or {DEFAULT_BASE_URL})"
    )
    common.add_argument("--api-key", help="API key (default: OPENAI_API_KEY, which is safer)")

    batch = sub.add_parser("batch", help="batches over HTTP (OpenAI's Batch API)")
    commands = batch.add_subparsers(dest="batch", required=True)

    submit_ = commands.add_parser(
        "submit",
        parents=[common],
        help="upload a JSONL file of requests and create its batch; prints the batch id last",
        description="Upload INPUT (the JSONL of `vllm run-batch` and OpenAI's Batch API: one "
        '{"custom_id", "method", "url": "/v1/chat/completions", "body"} a line) and create '
        "its batch. With --wait, follow it and download its results; exit 0 if it completed, "
        "1 if not, 130 on Ctrl-C (the batch goes on).",
    )
    submit_.add_argument("input", metavar="INPUT.jsonl")
    submit_.add_argument("--wait", action="store_true", help="follow it, then download results")
    submit_.add_argument(
        "--output", metavar="OUT.jsonl", help="results (implies --wait; default INPUT.output.jsonl)"
    )
    submit_.add_argument(
        "--errors", metavar="ERR.jsonl", help="errors (implies --wait; default INPUT.errors.jsonl)"
    )
    submit_.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        type=_metadata_pair,
        help="metadata to attach to the batch",
    )
    submit_.add_argument("--completion-window", default="24h", help="default: 24h")
    submit_.add_argument(
        "--poll", type=_positive_float, default=1.0, metavar="SECONDS", help="default: 1"
    )
    submit_.set_defaults(func=cmd_submit)

    status_ = commands.add_parser("status", parents=[common], help="show a batch")
    status_.add_argument("id")
    status_.add_argument("--json", action="store_true", help="print the batch's JSON")
    status_.set_defaults(func=cmd_status)

    cancel_ = commands.add_parser("cancel", parents=[common], help="cancel a batch")
    cancel_.add_argument("id")
    cancel_.set_defaults(func=cmd_cancel)

    list_ = commands.add_parser("list", parents=[common], help="list the latest batches")
    list_.add_argument("--limit", type=_positive_int, default=20, help="default: 20")
    list_.set_defaults(func=cmd_list)
