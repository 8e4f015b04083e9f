"""The lines of a batch's output and error files, as OpenAI writes them."""

import json
from types import SimpleNamespace

from api.batches.finalize import _job_line


def row(**fields: object) -> SimpleNamespace:
    base = {"id": "chatcmpl-abc", "custom_id": "c1", "response": None, "error": None}
    return SimpleNamespace(**{**base, "error_status": None, **fields})


def test_an_answered_line_has_its_response_and_a_null_error() -> None:
    line = json.loads(_job_line(row(response={"object": "chat.completion"})).line())
    assert line == {
        "id": "batch_req_abc",
        "custom_id": "c1",
        "response": {
            "status_code": 200,
            "request_id": "chatcmpl-abc",
            "body": {"object": "chat.completion"},
        },
        "error": None,
    }


def test_a_failed_line_answers_with_its_error_body_and_status() -> None:
    body = {"error": {"message": "no", "type": "server_error", "param": None, "code": "x"}}
    line = json.loads(_job_line(row(error=body, error_status=503)).line())
    assert line["response"] == {"status_code": 503, "request_id": "chatcmpl-abc", "body": body}
    assert line["error"] is None


def test_a_line_that_never_ran_has_an_error_with_code_and_message_only() -> None:
    body = {"error": {"message": "The batch was cancelled.", "code": "batch_cancelled"}}
    line = json.loads(_job_line(row(error=body, error_status=409)).line())
    assert line["response"] is None
    assert line["error"] == {"code": "batch_cancelled", "message": "The batch was cancelled."}
