"""A project's limits, as the API enforces them: which apply to a model, what a request is
estimated to cost, and how OpenAI words and heads its answers about them.

Per minute (interactive requests only; batches are not throttled per minute):
- requests (RPM) and tokens (TPM), each a bucket that holds a minute's worth and refills
  continuously, as OpenAI's do: `x-ratelimit-reset-*` is the time until the bucket is full again,
  and a refused request's Retry-After the time until it would pass;
- at once: interactive jobs queued or running (max_concurrent).
For batches: the tokens a project's batches in progress may hold (batch_queue_tokens).
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from core.wire.messages import text_chars
from core.wire.requests import ChatCompletionRequest

# The buckets' period: what "per minute" means.
WINDOW_SECONDS = 60
# Characters per token in the estimate: about right for English with the usual tokenizers.
CHARS_PER_TOKEN = 4
# A message costs a few tokens beside its text (its role, the chat template's markers).
TOKENS_PER_MESSAGE = 4


class LimitRow(Protocol):
    """A `project_limits` row, as far as this module reads it."""

    model: str | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    batch_queue_tokens: int | None


@dataclass(frozen=True)
class Limits:
    """The limits on one project's use of one model; None is no limit."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    batch_queue_tokens: int | None = None

    @property
    def interactive(self) -> bool:
        """Whether any limit applies to interactive requests (else they cost no Redis trip)."""
        return (self.rpm, self.tpm, self.max_concurrent) != (None, None, None)

    @classmethod
    def of(cls, row: LimitRow) -> "Limits":
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


NAMES = tuple(f.name for f in fields(Limits))


def for_model(rows: Iterable[LimitRow], model: str) -> Limits | None:
    """The limits on `model`: its own row if it has one, else the project-wide row; None if
    neither exists."""
    wide = None
    for row in rows:
        if row.model == model:
            return Limits.of(row)
        if row.model is None:
            wide = Limits.of(row)
    return wide


def estimate_tokens(body: ChatCompletionRequest, context_length: int | None) -> int:
    """What a request may cost, before it runs: its prompt (characters / 4, plus a few tokens a
    message) and all the output it may produce (`n` choices of its max tokens, or of the room
    its prompt leaves in the context)."""
    prompt = sum(
        math.ceil(text_chars(m) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in body.messages
    )
    asked = body.max_completion_tokens or body.max_tokens
    room = max(context_length - prompt, 1) if context_length is not None else None
    # Without max tokens, whatever room the context leaves (nothing known: the prompt alone).
    per_choice = asked if asked is not None else (room or 0)
    if room is not None:
        per_choice = min(per_choice, room)
    return prompt + (body.n or 1) * per_choice


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1s`, `1.5s`,
    `6m0s`, `1h2m3s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (at least 1), and `retry-after-ms`, which the openai SDK
    prefers when it is there."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


@dataclass(frozen=True)
class Bucket:
    """One per-minute limit's state after a request: its limit, what is left, and how long
    until it is full again."""

    limit: int
    remaining: int
    reset_seconds: float


def headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the per-minute limits a project has (none for a
    limit it has not)."""
    found: dict[str, str] = {}
    for kind, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            found[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            found[f"x-ratelimit-remaining-{kind}"] = str(max(bucket.remaining, 0))
            found[f"x-ratelimit-reset-{kind}"] = format_reset(bucket.reset_seconds)
    return found


def _wait(seconds: float) -> str:
    return format_reset(seconds) if seconds < 60 else f"{math.ceil(seconds)}s"


def requests_refused(model: str, project: str, limit: int, wait: float) -> str:
    return (
        f"Rate limit reached for {model} in project {project} on requests per min (RPM): "
        f"Limit {limit}, Used {limit}, Requested 1. Please try again in {_wait(wait)}."
    )


def tokens_refused(
    model: str, project: str, limit: int, used: int, requested: int, wait: float
) -> str:
    return (
        f"Rate limit reached for {model} in project {project} on tokens per min (TPM): "
        f"Limit {limit}, Used {used}, Requested {requested}. Please try again in {_wait(wait)}."
    )


def tokens_too_large(model: str, project: str, limit: int, requested: int) -> str:
    return (
        f"Request too large for {model} in project {project} on tokens per min (TPM): "
        f"Limit {limit}, Requested {requested}. The input or output tokens must be reduced in "
        "order to run successfully (the estimate counts max_completion_tokens, or the room "
        "left in the model's context without it)."
    )


def concurrency_refused(model: str, project: str, limit: int) -> str:
    return (
        f"Concurrency limit reached for {model} in project {project}: Limit {limit} requests "
        "queued or running at once. Please try again once one of them has ended."
    )


def batch_queue_refused(model: str, project: str, limit: int, in_use: int, requested: int) -> str:
    return (
        f"Enqueued token limit reached for {model} in project {project}. Limit: {limit:,} "
        f"enqueued tokens, {in_use:,} held by batches in progress; this batch needs "
        f"{requested:,}. Please try again once some in_progress batches have been completed."
    )


@dataclass(frozen=True)
class QueuedBatch:
    """A batch in progress, as far as the queue limit reads it."""

    queued_tokens: dict[str, int] | None
    total: int
    invalid: int
    completed: int
    failed: int


def batch_tokens_in_use(batches: Sequence[Any], model: str) -> int:
    """Tokens `batches` (in progress) still hold on `model`: each its estimate, less the share
    of its jobs that have ended."""
    used = 0
    for b in batches:
        reserved = (b.queued_tokens or {}).get(model, 0)
        valid = b.total - b.invalid
        if not reserved or valid <= 0:
            continue
        left = max(valid - b.completed - b.failed, 0)
        used += math.ceil(reserved * left / valid)
    return used
