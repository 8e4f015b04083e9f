"""The messages the API and the workers exchange through Redis, each encoding and decoding itself.

Published (pub/sub, every API process or every worker hears them):
- JobDone on JOB_DONE_CHANNEL: a job reached a final state (with its stored outcome, if small);
- BatchProgress on BATCH_PROGRESS_CHANNEL: some of a batch's jobs ended or went back to the queue;
- JobCancel on JOB_CANCEL_CHANNEL: the API cancelled a job; the worker running it aborts it;
- LookupsChanged on LOOKUPS_CHANGED_CHANNEL: a key was revoked, a model (re)announced or a
  project's limits changed.
A streamed job's entries (a Redis stream per job, worker -> API): StreamChunk ..., then
StreamDone or StreamError. A batch chunk (the body of a message in a model's batch queue):
BatchChunk.
"""

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

JOB_DONE_CHANNEL = "ferry:jobs:done"
BATCH_PROGRESS_CHANNEL = "ferry:batches:progress"
JOB_CANCEL_CHANNEL = "ferry:jobs:cancel"
LOOKUPS_CHANGED_CHANNEL = "ferry:lookups:changed"

# A stored result rides with its job-done notification only up to this size; a larger one is
# read back from Postgres. Pub/sub sends every message whole to every API process, and Redis
# disconnects a subscriber whose output buffer overflows (32 MiB by default).
NOTIFIED_RESULT_MAX_BYTES = 64 << 10

# A job's stream is kept this long after its last entry (the API deletes it once delivered).
STREAM_TTL_SECONDS = 600


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass(frozen=True)
class JobOutcome:
    """What a worker stored for a job, as its job-done notification carries it."""

    status: Literal["succeeded", "failed"]
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    error_status: int | None = None


@dataclass(frozen=True)
class JobDone:
    """A job reached a final state; `outcome` spares the waiting API a read when it is sent."""

    channel: ClassVar[str] = JOB_DONE_CHANNEL
    job_id: str
    outcome: JobOutcome | None = None

    def encode(self) -> str:
        """The job's id, with its outcome as JSON if that fits in NOTIFIED_RESULT_MAX_BYTES."""
        if self.outcome is None:
            return self.job_id
        # The fields as they are: asdict would deep-copy the response first.
        outcome = {f.name: getattr(self.outcome, f.name) for f in fields(JobOutcome)}
        message = json.dumps({"id": self.job_id, **outcome})
        return message if len(message) <= NOTIFIED_RESULT_MAX_BYTES else self.job_id

    @classmethod
    def decode(cls, raw: bytes | str) -> "JobDone":
        text = _text(raw)
        if not text.startswith("{"):
            return cls(text)
        fields = json.loads(text)
        return cls(fields.pop("id"), JobOutcome(**fields))


IdT = TypeVar("IdT", bound="_Id")


@dataclass(frozen=True)
class _Id:
    """A message that is one id."""

    channel: ClassVar[str]

    def encode(self) -> str:
        return getattr(self, fields(self)[0].name)

    @classmethod
    def decode(cls: type[IdT], raw: bytes | str) -> IdT:
        return cls(**{fields(cls)[0].name: _text(raw)})


@dataclass(frozen=True)
class BatchProgress(_Id):
    """Some of a batch's jobs ended or were handed back: the API looks at the batch again."""

    channel: ClassVar[str] = BATCH_PROGRESS_CHANNEL
    batch_id: str


@dataclass(frozen=True)
class JobCancel(_Id):
    """The API cancelled a job: the worker running it aborts it in its engine."""

    channel: ClassVar[str] = JOB_CANCEL_CHANNEL
    job_id: str


@dataclass(frozen=True)
class LookupsChanged(_Id):
    """A key, a model or limits changed (`what` names it): API processes drop their cached
    lookups."""

    channel: ClassVar[str] = LOOKUPS_CHANGED_CHANNEL
    what: str


Published = JobDone | BatchProgress | JobCancel | LookupsChanged


def publish(client: Any, message: Published) -> Any:
    """Publish `message` on its channel with a Redis client or pipeline, sync or asyncio (whose
    caller awaits what this returns)."""
    return client.publish(message.channel, message.encode())


@dataclass(frozen=True)
class StreamChunk:
    """One chunk of a streamed completion, as the JSON text of its Server-Sent Event."""

    data: bytes

    def encode(self) -> dict[str, bytes]:
        return {"chunk": self.data}


@dataclass(frozen=True)
class StreamDone:
    """The stream's end: the completion is stored."""

    def encode(self) -> dict[str, str]:
        return {"done": "1"}


@dataclass(frozen=True)
class StreamError:
    """The stream ends with an error: OpenAI's envelope and the HTTP status it answers with."""

    envelope: dict[str, Any]
    status: int

    def encode(self) -> dict[str, str | int]:
        return {"error": json.dumps(self.envelope), "status": self.status}


StreamEntry = StreamChunk | StreamDone | StreamError


def read_entry(fields: dict[bytes, bytes]) -> StreamEntry:
    """A stream entry from the fields Redis returns for it."""
    if b"chunk" in fields:
        return StreamChunk(fields[b"chunk"])
    if b"done" in fields:
        return StreamDone()
    return StreamError(json.loads(fields[b"error"]), int(fields.get(b"status", 500)))


def stream_key(job_id: str) -> str:
    """The Redis stream a streamed job's entries travel through, from the worker to the API."""
    return f"ferry:stream:{job_id}"


def add_to_stream(pipe: Any, job_id: str, entry: StreamEntry) -> None:
    """Queue an entry of a job's stream on a Redis pipeline (sync or asyncio), with the stream's
    expiry: each write sets it again, so that a stream lives STREAM_TTL_SECONDS past its last
    entry whoever writes it (worker, API, reconciler) and whether or not anyone ends or reads it.
    Every XADD to a job's stream goes through here: Redis has no XADD that sets a TTL."""
    key = stream_key(job_id)
    pipe.xadd(key, entry.encode())
    pipe.expire(key, STREAM_TTL_SECONDS)


@dataclass(frozen=True)
class BatchChunk:
    """A message of a model's batch queue: up to BATCH_CHUNK (core.queue) of its jobs, by id."""

    job_ids: list[str]

    def encode(self) -> dict[str, list[str]]:
        return {"job_ids": self.job_ids}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> "BatchChunk":
        return cls(list(body["job_ids"]))
