"""The resource objects built from rows, as they go on the wire (no servers needed)."""

from datetime import UTC, datetime
from typing import Any

from core.tables import Batch, BatchStatus, Job, JobStatus, StoredFile
from core.wire.resources import (
    BatchList,
    BatchObject,
    ChatCompletionList,
    ChatCompletionMessageList,
    FileList,
    FileObject,
    StoredChatCompletion,
    StoredMessage,
)
from tests.openai_schema import validate
from workers import shaping

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def wire(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


def job(**fields: Any) -> Job:
    defaults: dict[str, Any] = {
        "id": "chatcmpl-1",
        "model": "m",
        "created": 7,
        "status": JobStatus.queued,
        "metadata_": None,
        "error": None,
        "response": None,
    }
    return Job(**{**defaults, **fields})


def stored_answer(metadata: dict[str, str] | None, **message: Any) -> dict[str, Any]:
    """An answer as the worker stores it."""
    raw = {
        "id": "vllm-id",
        "created": 9,
        "model": "/path",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [{"token": "Hi", "logprob": -0.5, "top_logprobs": []}],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    answering = shaping.Answering(
        id="chatcmpl-1", model="m", created=7, system_fingerprint="fp_1", metadata=metadata
    )
    return shaping.completion(raw, answering)


def test_a_stored_answer_is_sent_as_stored_with_its_status() -> None:
    for answer in (
        stored_answer(None, content="Hi"),
        stored_answer({"a": "b"}, content=None, tool_calls=[CALL]),
    ):
        done = job(status=JobStatus.succeeded, response=answer, metadata_=answer.get("metadata"))
        body = wire(StoredChatCompletion.of(done))
        assert body == {**answer, "status": "succeeded"}
        validate("CreateChatCompletionResponse", body)


def test_a_completion_without_its_answer_has_no_choices() -> None:
    assert wire(StoredChatCompletion.of(job())) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [],
        "status": "queued",
    }
    error = {"message": "gone", "type": "invalid_request_error", "param": None, "code": "x"}
    failed = job(status=JobStatus.failed, error={"error": error}, metadata_={"k": "v"})
    body = wire(StoredChatCompletion.of(failed))
    assert body["error"] == error and body["metadata"] == {"k": "v"}
    assert body["status"] == "failed"


def test_messages_carry_their_calls_only_when_they_have_some() -> None:
    user = StoredMessage.of("c", 0, {"role": "user", "content": "hi", "tool_calls": []})
    assert wire(user) == {
        "id": "c-0",
        "role": "user",
        "content": "hi",
        "refusal": None,
        "name": None,
        "content_parts": None,
    }
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]
    parted = wire(StoredMessage.of("c", 1, {"role": "user", "content": parts, "name": "n"}))
    assert (parted["content"], parted["content_parts"], parted["name"]) == ("a", parts, "n")
    called = wire(StoredMessage.of("c", 2, {"role": "assistant", "tool_calls": [CALL]}))
    assert called["tool_calls"] == [CALL] and "tool_call_id" not in called
    answer = wire(StoredMessage.of("c", 3, {"role": "tool", "tool_call_id": "call_1"}))
    assert answer["tool_call_id"] == "call_1" and "tool_calls" not in answer
    page = ChatCompletionMessageList.of([StoredMessage.of("c", 0, {"role": "user"})], 20)
    validate("ChatCompletionMessageList", {**wire(page), "data": []})


def test_file_object() -> None:
    file = StoredFile(id="file-1", filename="in.jsonl", purpose="batch", bytes=12, created_at=NOW)
    body = wire(FileObject.of(file))
    assert body == {
        "id": "file-1",
        "bytes": 12,
        "created_at": int(NOW.timestamp()),
        "filename": "in.jsonl",
        "object": "file",
        "purpose": "batch",
        "status": "processed",
    }
    validate("OpenAIFile", body)
    validate("ListFilesResponse", wire(FileList.of([FileObject.of(file)], 10)))


def batch(**fields: Any) -> Batch:
    counts = ("total", "invalid", "completed", "failed", "prompt_tokens", "completion_tokens")
    defaults: dict[str, Any] = {
        "id": "batch_1",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": BatchStatus.validating,
        "created_at": NOW,
        **{name: 0 for name in counts},
    }
    return Batch(**{**defaults, **fields})


def test_a_batch_leaves_out_what_it_has_not_reached_and_keeps_null_metadata() -> None:
    body = wire(BatchObject.of(batch()))
    validate("Batch", body)
    assert body["metadata"] is None
    absent = {"model", "errors", "output_file_id", "error_file_id", "in_progress_at"}
    assert not absent & set(body)
    assert not {name for name in body if name.endswith("_at")} - {"created_at"}


def test_a_finished_batch_has_its_files_times_errors_and_counts() -> None:
    error = {"code": "c", "message": "m", "param": None, "line": 3}
    done = batch(
        status=BatchStatus.failed,
        model="m",
        output_file_id="file-2",
        error_file_id="file-3",
        errors={"object": "list", "data": [error]},
        failed_at=NOW,
        total=4,
        completed=1,
        failed=1,
        invalid=2,
        prompt_tokens=5,
        completion_tokens=6,
        metadata_={"k": "v"},
    )
    body = wire(BatchObject.of(done))
    validate("Batch", body)
    assert body["errors"] == {"object": "list", "data": [error]}
    assert (body["model"], body["output_file_id"], body["error_file_id"]) == (
        "m",
        "file-2",
        "file-3",
    )
    assert body["failed_at"] == int(NOW.timestamp()) and "completed_at" not in body
    assert body["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    assert body["usage"]["total_tokens"] == 11 and body["metadata"] == {"k": "v"}
    validate("ListBatchesResponse", wire(BatchList.of([BatchObject.of(done)], 20)))


def test_pages_of_stored_completions() -> None:
    page = ChatCompletionList.of([StoredChatCompletion.of(job(id=f"c{i}")) for i in range(3)], 2)
    body = wire(page)
    assert (body["first_id"], body["last_id"], body["has_more"]) == ("c0", "c1", True)
    validate("ChatCompletionList", {**body, "data": []})
