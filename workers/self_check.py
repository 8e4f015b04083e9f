"""The engine's known-answer check, run after it loads and before the worker announces its model.

An engine can load, take requests and still compute nonsense: vLLM's CPU kernels for bfloat16 in
compiled mode answer gibberish on some hosts (AMD EPYC with avx512_bf16) and right on others. So
a worker asks the engine a few questions with known answers, greedily, and serves nothing if one
comes back wrong. The default model has its questions here; another model gets them from a JSONL
file named by FERRY_SELF_CHECK_FILE, one `{"prompt": ..., "expected": ...}` per line, where
`expected` is a substring of the right answer (compared without regard to case).
"""

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import FerryError
from core.settings import WorkerSettings
from workers.engine import LoopHost

log = logging.getLogger(__name__)

# A worker exits with these codes; a supervisor (scripts/run-local.sh) reads them.
EXIT_BAD_SETTINGS = 2
EXIT_ENGINE_DEAD = 3
EXIT_SELF_CHECK_FAILED = 4
# Long enough for the expected word to come, short enough to take a second or two.
ANSWER_TOKENS = 32


@dataclass(frozen=True)
class Check:
    """One question and a substring its right answer contains."""

    prompt: str
    expected: str


# SmolLM2-135M-Instruct's answers, greedy, the same in bfloat16 and float32, eager and compiled,
# on hosts that compute right; on an AMD EPYC with avx512_bf16, compiled bfloat16 gets France
# wrong. (Questions whose answer changes with the dtype, such as Italy's capital, are left out.)
DEFAULT_CHECKS = (
    Check("What is the capital of France?", "Paris"),
    Check("What is the capital of Japan?", "Tokyo"),
    Check("What is the capital of Germany?", "Berlin"),
    Check("What is the capital of England?", "London"),
    Check("What is the chemical symbol for water?", "H2O"),
    Check("Which animal says meow?", "a cat"),
    Check("What is the opposite of hot?", "cold"),
)


@dataclass
class Result:
    """What the check found: the questions answered wrong, with the answers given."""

    total: int
    wrong: list[tuple[Check, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.wrong

    def summary(self) -> str:
        """One line for logs, metrics and the dashboard."""
        right = self.total - len(self.wrong)
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"self-check {verdict}: {right} of {self.total} known answers in {self.seconds:.1f} s"
        )


class ChecksFileError(ValueError):
    """The self-check file cannot be read as checks."""


def load_checks(path: str | Path) -> tuple[Check, ...]:
    """The checks in a JSONL file of `{"prompt": ..., "expected": ...}` lines."""
    checks = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ChecksFileError(f"FERRY_SELF_CHECK_FILE {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            checks.append(Check(prompt=item["prompt"], expected=item["expected"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ChecksFileError(
                f"FERRY_SELF_CHECK_FILE {path}, line {number}: expected an object with the "
                f'strings "prompt" and "expected" ({exc!r})'
            ) from exc
        if not isinstance(item["prompt"], str) or not isinstance(item["expected"], str):
            raise ChecksFileError(
                f"FERRY_SELF_CHECK_FILE {path}, line {number}: prompt and expected must be strings"
            )
    if not checks:
        raise ChecksFileError(f"FERRY_SELF_CHECK_FILE {path} holds no checks")
    return tuple(checks)


def failures(checks: Sequence[Check], answers: Sequence[str]) -> list[tuple[Check, str]]:
    """The checks whose answer lacks the expected text, with that answer."""
    return [
        (check, answer)
        for check, answer in zip(checks, answers, strict=True)
        if check.expected.casefold() not in answer.casefold()
    ]


def checks_for(settings: WorkerSettings, default_model: bool) -> tuple[Check, ...]:
    """The checks this worker runs: the file's, else the default model's, else none."""
    if settings.self_check_file:
        return load_checks(settings.self_check_file)
    return DEFAULT_CHECKS if default_model else ()


def run(engine: LoopHost, model: str, checks: Sequence[Check]) -> Result:
    """Ask the engine every check at once, greedily; what it got wrong."""

    async def ask(index: int, check: Check) -> str:
        fields = {
            "model": model,
            "messages": [{"role": "user", "content": check.prompt}],
            "temperature": 0,
            "max_tokens": ANSWER_TOKENS,
        }
        try:
            answer = await engine.complete(f"self-check-{index}", fields)
        except FerryError as exc:
            return f"(error: {exc})"
        return answer["choices"][0]["message"].get("content") or ""

    async def ask_all() -> list[str]:
        return await asyncio.gather(*(ask(i, check) for i, check in enumerate(checks)))

    started = time.perf_counter()
    answers = engine.run(ask_all())
    return Result(len(checks), failures(checks, answers), time.perf_counter() - started)


def explain(result: Result, settings: WorkerSettings, on_cpu: bool = True) -> str:
    """The error a worker prints when its engine fails the check: what, why, and what to set.
    `on_cpu`: the engine is vLLM's CPU build, whose bfloat16 kernels answer wrong on some hosts."""
    wrong = "\n".join(
        f"  asked {c.prompt!r}, expected {c.expected!r}, got {a[:80]!r}" for c, a in result.wrong
    )
    mode = "eager" if settings.enforce_eager else "compiled"
    running = (
        f"The engine runs dtype={settings.dtype}, {mode} (FERRY_DTYPE={settings.dtype}, "
        f"FERRY_ENFORCE_EAGER={str(settings.enforce_eager).lower()}"
        + (f", FERRY_ENGINE_ARGS={settings.engine_args!r}" if settings.engine_args else "")
        + ")."
    )
    if on_cpu and settings.dtype in ("auto", "bfloat16", "bf16"):
        cause = (
            "The likely cause is the engine's bfloat16 kernels on this host: vLLM's CPU build "
            "answers wrong with bfloat16 on some CPUs (compiled on AMD EPYC with avx512_bf16, "
            "eager on Intel with AMX). Set FERRY_DTYPE=float32 (the default on CPU builds) "
            "and start the worker again."
        )
    else:
        cause = (
            "The likely cause is a setting that changes the model's arithmetic"
            + (": FERRY_ENGINE_ARGS first" if settings.engine_args else "")
            + "; else the model's files, or the host's kernels for this dtype: try "
            "FERRY_DTYPE=float32, or FERRY_ENFORCE_EAGER=true if it is false."
        )
    other = (
        " If the model is not the default one, check that FERRY_SELF_CHECK_FILE holds answers "
        "this model gives."
        if settings.self_check_file
        else ""
    )
    return (
        f"{result.summary()}; the engine answers wrong and this worker will not serve "
        f"{settings.model}.\n{wrong}\n{running} {cause}{other}"
    )
