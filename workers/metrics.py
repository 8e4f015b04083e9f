"""A worker's Prometheus metrics, served at http://FERRY_METRICS_HOST:FERRY_METRICS_PORT/metrics.

The task code calls `job_started` when it hands jobs to the engine, `job_finished` when each
ends (`job_released` for one handed back unfinished), and `engine_error` when the engine fails.
Tokens are counters: `rate()` gives tokens/s.
"""

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    start_http_server,
)

log = logging.getLogger(__name__)

# No `_created` series beside each counter: they double the output and Prometheus ignores them.
disable_created_metrics()

OUTCOMES = ("succeeded", "failed", "cancelled")

WORKER = Info("ferry_worker", "The worker: its id and the model it serves.")
JOBS_IN_ENGINE = Gauge("ferry_worker_jobs_in_engine", "Jobs this worker's engine holds now.")
JOBS = Counter("ferry_worker_jobs", "Jobs this worker ran to an end, by outcome.", ["outcome"])
PROMPT_TOKENS = Counter("ferry_worker_prompt_tokens", "Prompt tokens of the jobs that succeeded.")
OUTPUT_TOKENS = Counter(
    "ferry_worker_output_tokens", "Completion tokens of the jobs that succeeded."
)
ENGINE_ERRORS = Counter(
    "ferry_worker_engine_errors", "Requests the engine failed on, or found it dead."
)
SELF_CHECK_PASSED = Gauge(
    "ferry_worker_self_check_passed",
    "1 if the engine gave every known answer of its self-check, 0 if not, -1 if none was run.",
)
SELF_CHECK_PASSED.set(-1)
SELF_CHECK_SECONDS = Gauge("ferry_worker_self_check_seconds", "How long the self-check took.")
for _outcome in OUTCOMES:
    JOBS.labels(outcome=_outcome)  # every outcome's series exists from the start, at 0


def job_started(count: int = 1) -> None:
    """`count` jobs went into the engine."""
    JOBS_IN_ENGINE.inc(count)


def job_finished(outcome: str, usage: Mapping[str, Any] | None = None) -> None:
    """A job that `job_started` counted left the engine: `outcome` is one of OUTCOMES;
    `usage` is the response's OpenAI usage object, whose tokens are counted."""
    JOBS_IN_ENGINE.dec()
    JOBS.labels(outcome=outcome).inc()
    if usage:
        PROMPT_TOKENS.inc(usage.get("prompt_tokens") or 0)
        OUTPUT_TOKENS.inc(usage.get("completion_tokens") or 0)


def job_released(count: int = 1) -> None:
    """`count` jobs left the engine without ending (aborted to be handed back to the queue)."""
    JOBS_IN_ENGINE.dec(count)


def self_check_done(passed: bool, seconds: float) -> None:
    """The engine's known-answer check ended."""
    SELF_CHECK_PASSED.set(1 if passed else 0)
    SELF_CHECK_SECONDS.set(seconds)


def engine_error() -> None:
    """The engine failed on a request (or died)."""
    ENGINE_ERRORS.inc()


def serve(port: int, model: str = "", worker_id: str = "", host: str = "127.0.0.1") -> None:
    """Serve the metrics on `host`:`port` from a daemon thread; port 0 serves nothing.

    A port already taken is logged and skipped: metrics are not worth a worker.
    """
    WORKER.info({"model": model, "worker_id": worker_id})
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error("metrics not served: %s:%d: %s", host, port, exc)
        return
    log.info("metrics at http://%s:%d/metrics", host, port)
