"""A batch line's checks without the stack: every limit of a column a line fills is a line error
found at parse time, never a database error that fails the whole batch."""

import json
from types import SimpleNamespace
from typing import Any

import pytest

from api import files
from api.batches.ingest import Lines
from api.batches.lines import MAX_CUSTOM_ID, Line, Served, read_lines
from core.errors import InvalidRequestError
from core.settings import ApiSettings
from core.tables import BatchLineError, Job, StoredFile

MODEL = "m"
SERVED = Served(capabilities=[], max_model_len=2048)
SETTINGS = ApiSettings()


def raw(custom_id: Any = "a", **body: Any) -> bytes:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
        }
    ).encode()


def one(line: bytes) -> Line:
    (read,) = read_lines([line], {MODEL: SERVED}, SETTINGS)
    assert read is not None
    return read


def test_the_limits_are_the_columns() -> None:
    assert Job.__table__.c.custom_id.type.length == MAX_CUSTOM_ID  # type: ignore[attr-defined]
    assert BatchLineError.__table__.c.custom_id.type.length == MAX_CUSTOM_ID  # type: ignore[attr-defined]
    assert StoredFile.__table__.c.filename.type.length == files.MAX_FILENAME  # type: ignore[attr-defined]


def test_custom_id_longer_than_its_column_is_a_line_error() -> None:
    line = one(raw("x" * (MAX_CUSTOM_ID + 1)))
    assert line.custom_id is None and line.job is None
    assert line.error_custom_id is None  # too long to store with the error either
    assert line.error is not None
    assert (line.error["code"], line.error["param"]) == ("string_above_max_length", "custom_id")
    assert f"maximum length {MAX_CUSTOM_ID}" in line.error["message"]
    assert one(raw("x" * MAX_CUSTOM_ID)).job is not None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"metadata": {"k" * 65: "v"}}, "body.metadata." + "k" * 65, "string_above_max_length"),
        ({"metadata": {"k": "v" * 513}}, "body.metadata.k", "string_above_max_length"),
        (
            {"metadata": {f"k{i}": "v" for i in range(17)}},
            "body.metadata",
            "object_above_max_properties",
        ),
        ({"model": "m" * 300}, "body.model", "model_not_found"),
    ],
)
def test_other_column_limits_are_line_errors(body: dict, param: str, code: str) -> None:
    line = one(raw(**body))
    assert line.error is not None and line.job is None
    assert (line.error["param"], line.error["code"]) == (param, code)
    assert line.custom_id == "a"


def test_nan_and_infinity_are_not_json() -> None:
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = raw(temperature=1).replace(
            b'"temperature": 1', b'"temperature": ' + constant.encode()
        )
        line = one(text)
        assert line.error is not None and line.error["code"] == "invalid_json"


def test_a_valid_line_is_a_job_with_its_request_as_json_text() -> None:
    line = one(raw(max_tokens=1, metadata={"k": "v"}, store=True))
    assert line.error is None and line.job is not None
    assert json.loads(line.job["request"])["max_tokens"] == 1
    assert (line.job["store"], line.job["metadata"]) == (True, {"k": "v"})


def test_lines_are_numbered_without_blanks_and_repeated_ids_fail() -> None:
    batch = SimpleNamespace(id="batch_x", project="p", api_key_id="k")
    lines = Lines(batch, most=3)  # type: ignore[arg-type]
    read = read_lines(
        [raw("a"), b"  ", raw("a"), raw("b", temperature=9)], {MODEL: SERVED}, SETTINGS
    )
    jobs, errors, too_many = lines.take(read)
    assert not too_many
    assert [j["line_number"] for j in jobs] == [1]
    assert [(e["line"], e["error"]["code"]) for e in errors] == [
        (2, "duplicate_custom_id"),
        (3, "decimal_above_max_value"),
    ]
    assert errors[0]["error"]["message"].startswith("Line 2: ")
    assert (lines.lines, lines.jobs, lines.invalid) == (3, 1, 2)
    _, _, too_many = lines.take(read_lines([raw("c")], {MODEL: SERVED}, SETTINGS))
    assert too_many


def test_file_names_the_table_cannot_hold_are_refused() -> None:
    files.check_filename("x" * (files.MAX_FILENAME - len(".jsonl")) + ".jsonl")
    with pytest.raises(InvalidRequestError) as caught:
        files.check_filename("x" * 1100 + ".jsonl")
    assert (caught.value.param, caught.value.code) == ("file", "string_above_max_length")
    with pytest.raises(InvalidRequestError) as caught:
        files.check_filename("a\x00b.jsonl")
    assert (caught.value.param, caught.value.code) == ("file", "invalid_value")
