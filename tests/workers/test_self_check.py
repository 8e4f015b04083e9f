"""The engine's known-answer check: its file, its verdict, its message (fast; no engine)."""

import json
from pathlib import Path

import pytest

from core.settings import WorkerSettings
from workers import self_check
from workers.fake_engine import FAKE_TEXT, FakeEngineHost
from workers.self_check import Check, ChecksFileError, load_checks


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_checks_file_is_read_line_by_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "checks.jsonl",
        json.dumps({"prompt": "What is 2 + 2?", "expected": "4"}),
        "",
        json.dumps({"prompt": "Capital of France?", "expected": "Paris"}),
    )
    assert load_checks(path) == (
        Check("What is 2 + 2?", "4"),
        Check("Capital of France?", "Paris"),
    )


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (["not json"], "line 1"),
        ([json.dumps({"prompt": "p"})], "line 1"),
        ([json.dumps({"prompt": "p", "expected": "e"}), json.dumps([1])], "line 2"),
        ([json.dumps({"prompt": "p", "expected": 4})], "must be strings"),
        ([], "holds no checks"),
    ],
)
def test_a_bad_checks_file_is_named_with_its_line(
    tmp_path: Path, lines: list[str], says: str
) -> None:
    path = write(tmp_path / "checks.jsonl", *lines)
    with pytest.raises(ChecksFileError, match=says) as raised:
        load_checks(path)
    assert "FERRY_SELF_CHECK_FILE" in str(raised.value)


def test_a_missing_checks_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ChecksFileError, match="No such file"):
        load_checks(tmp_path / "absent.jsonl")


def test_an_answer_passes_when_it_holds_the_expected_text_in_any_case() -> None:
    checks = [Check("a", "Paris"), Check("b", "H2O"), Check("c", "Tokyo")]
    answers = ["The capital of France is PARIS.", "h2o", "L'Étoile, la Marseillaise"]
    assert self_check.failures(checks, answers) == [(checks[2], answers[2])]


def test_the_default_model_is_checked_and_another_only_with_a_file(tmp_path: Path) -> None:
    settings = WorkerSettings(model="other", model_path=str(tmp_path))
    assert self_check.checks_for(settings, default_model=True) == self_check.DEFAULT_CHECKS
    assert self_check.checks_for(settings, default_model=False) == ()
    path = write(tmp_path / "c.jsonl", json.dumps({"prompt": "p", "expected": "e"}))
    with_file = settings.model_copy(update={"self_check_file": str(path)})
    assert self_check.checks_for(with_file, default_model=False) == (Check("p", "e"),)


def test_the_check_asks_the_engine_and_judges_its_answers() -> None:
    # The fake engine answers FAKE_TEXT to everything: one check expects it, one does not.
    engine = FakeEngineHost(WorkerSettings(engine="fake"), "")
    engine.start()
    try:
        checks = [Check("anything", FAKE_TEXT), Check("capital of France?", "Paris")]
        result = self_check.run(engine, "m", checks)
    finally:
        engine.close()
    assert not result.passed
    assert result.wrong == [(checks[1], FAKE_TEXT)]
    assert result.summary().startswith("self-check FAILED: 1 of 2 known answers")


def test_the_failure_message_names_the_cause_and_the_settings_to_change() -> None:
    wrong = [(Check("What is the capital of France?", "Paris"), "L'Étoile, la femme")]
    for eager in (True, False):
        settings = WorkerSettings(dtype="bfloat16", enforce_eager=eager)
        message = self_check.explain(self_check.Result(7, wrong, 1.0), settings)
        assert "6 of 7" in message and "L'Étoile, la femme" in message
        assert f"dtype=bfloat16, {'eager' if eager else 'compiled'}" in message
        assert "bfloat16 kernels" in message and "FERRY_DTYPE=float32" in message
    settings = WorkerSettings(dtype="float32", enforce_eager=False)
    message = self_check.explain(self_check.Result(7, wrong, 1.0), settings)
    assert "FERRY_ENFORCE_EAGER=true" in message and "bfloat16 kernels" not in message
    # On a GPU, the model's own dtype is not blamed on the CPU build's kernels.
    settings = WorkerSettings(dtype="auto", enforce_eager=False)
    message = self_check.explain(self_check.Result(7, wrong, 1.0), settings, on_cpu=False)
    assert "bfloat16 kernels" not in message and "CPU build" not in message
    assert "FERRY_DTYPE=float32" in message
