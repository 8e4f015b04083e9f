"""Each message between the API and the workers reads back as it was written."""

import json

import pytest

from core.bus import (
    NOTIFIED_RESULT_MAX_BYTES,
    BatchChunk,
    BatchProgress,
    JobCancel,
    JobDone,
    JobOutcome,
    LookupsChanged,
    StreamChunk,
    StreamDone,
    StreamError,
    read_entry,
)
from core.handback import Lost
from core.queue import Dispatch


def test_a_small_result_rides_with_its_notification_and_a_large_one_does_not() -> None:
    small = JobDone("chatcmpl-1", JobOutcome("succeeded", response={"content": "x" * 100}))
    assert JobDone.decode(small.encode().encode()) == small
    large = JobDone(
        "chatcmpl-2", JobOutcome("succeeded", response={"content": "x" * NOTIFIED_RESULT_MAX_BYTES})
    )
    assert large.encode() == "chatcmpl-2"
    assert JobDone.decode(large.encode()) == JobDone("chatcmpl-2")


def test_a_failed_outcome_keeps_its_error_and_status() -> None:
    failed = JobDone(
        "chatcmpl-3", JobOutcome("failed", error={"error": {"code": "x"}}, error_status=400)
    )
    assert JobDone.decode(failed.encode()) == failed


@pytest.mark.parametrize(
    "message",
    [BatchProgress("batch_1"), JobCancel("chatcmpl-4"), LookupsChanged("keys")],
)
def test_id_messages_are_their_id_on_their_own_channel(message) -> None:
    assert message.encode() == next(iter(vars(message).values()))
    assert type(message).decode(message.encode().encode()) == message
    assert message.channel.startswith("ferry:")


def test_channels_differ() -> None:
    channels = [m.channel for m in (JobDone, BatchProgress, JobCancel, LookupsChanged)]
    assert len(set(channels)) == len(channels)


def _as_redis_returns(fields: dict) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


@pytest.mark.parametrize(
    "entry",
    [
        StreamChunk(b'{"id": "chatcmpl-5", "choices": []}'),
        StreamDone(),
        StreamError({"error": {"message": "gone", "code": "worker_lost"}}, 503),
    ],
)
def test_stream_entries_read_back_as_written(entry) -> None:
    assert read_entry(_as_redis_returns(entry.encode())) == entry


def test_a_batch_chunk_reads_back_from_its_json_body() -> None:
    chunk = BatchChunk([f"chatcmpl-{i}" for i in range(3)])
    assert BatchChunk.decode(json.loads(json.dumps(chunk.encode()))) == chunk


class _Pipe:
    """Records what would be queued on a Redis pipeline."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def publish(self, channel: str, data: str) -> None:
        self.calls.append(("publish", channel, data))

    def xadd(self, key: str, fields: dict) -> None:
        self.calls.append(("xadd", key, read_entry(_as_redis_returns(fields))))

    def expire(self, key: str, seconds: int) -> None:
        self.calls.append(("expire", key))


def test_lost_jobs_tell_streams_waiters_and_batches() -> None:
    lost = Lost(
        given_up=[("chatcmpl-s", None, True), ("chatcmpl-b", "batch_1", False)],
        requeued=[("chatcmpl-r", "m", "p", "batch_2"), ("chatcmpl-i", "m", "p", None)],
        reason="The worker running this request was lost.",
    )
    # A batch's line goes back to its project's batch queue, an interactive job to the model's.
    assert lost.to_send() == [Dispatch("chatcmpl-r", "m", "p"), Dispatch("chatcmpl-i", "m")]
    pipe = _Pipe()
    lost.tell(pipe)
    xadd = next(call for call in pipe.calls if call[0] == "xadd")
    assert xadd[1] == "ferry:stream:chatcmpl-s" and isinstance(xadd[2], StreamError)
    assert xadd[2].status == 503 and xadd[2].envelope["error"]["code"] == "worker_lost"
    published = [(c[1], c[2]) for c in pipe.calls if c[0] == "publish"]
    assert published == [
        (JobDone.channel, "chatcmpl-s"),
        (JobDone.channel, "chatcmpl-b"),
        (BatchProgress.channel, "batch_1"),
        (BatchProgress.channel, "batch_2"),
    ]
