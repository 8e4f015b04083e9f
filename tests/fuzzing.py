"""What the schemathesis runs share, whichever OpenAPI document drives them (Ferry's own, or
OpenAI's restricted to what Ferry serves): the cap that keeps generated chat completions cheap,
the loop over every operation (schemathesis' coverage phase, then generated requests), and a walk
over real objects that generated requests rarely reach.

Generation is derandomized: the same document and hooks give the same requests on every run.
"""

import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, BaseSchema, GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.core.result import Err

from tests.conftest import MODEL

URL = "/v1/chat/completions"
TOKENS_CAP = 2
CHOICES_CAP = 2
# Fields this deployment refuses (capabilities its worker does not declare).
REFUSED_HERE = (
    "modalities",
    "audio",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "moderation",
)
# Failures kept per operation and phase: the first few say enough.
MAX_FAILURES = 5

Budget = dict[GenerationMode, int]
BodyHook = Callable[[Any], Any]


def cheap(body: Any) -> Any:
    """A generated chat completion request, routed to the served model and kept short."""
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    # One request in five keeps its model name as generated: those test the 404 (and an empty
    # name, which generation favours, the 400).
    if isinstance(model, str) and zlib.crc32(f"{model}{body.get('messages')}".encode()) % 5:
        body["model"] = MODEL
    # Refused fields go from four requests in five, so that the rest of those requests reaches
    # the engine.
    if zlib.crc32(repr(sorted(body)).encode()) % 5:
        for name in REFUSED_HERE:
            body.pop(name, None)
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > TOKENS_CAP:
            body[name] = TOKENS_CAP
    if "max_completion_tokens" not in body and "max_tokens" not in body:
        body["max_completion_tokens"] = TOKENS_CAP
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > CHOICES_CAP:
        body["n"] = CHOICES_CAP
    return body


def wait_until_ready(base_url: str, timeout: float = 60) -> None:
    """Return once `/readyz` answers 200: a live worker serves the model."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the stack is not ready"
        time.sleep(0.5)


def operations(schema: BaseSchema) -> list[APIOperation]:
    """Every operation of `schema`; one schemathesis cannot read fails the run here."""
    found = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        found.append(result.ok())
    return found


def is_chat(operation: APIOperation, chat_path: str) -> bool:
    """Whether `operation` is `POST` on the chat completions path."""
    return (operation.method.upper(), operation.path) == ("POST", chat_path)


def cap_chat_completions(schema: BaseSchema, chat_path: str, *more: BodyHook) -> None:
    """Every generated chat completion body goes through `more`, then `cheap`."""

    @schema.hook
    def map_body(context: schemathesis.HookContext, body: Any) -> Any:
        if context.operation is None or not is_chat(context.operation, chat_path):
            return body
        for hook in more:
            body = hook(body)
        return cheap(body)


@dataclass
class Run:
    """What a run sent and got: requests per operation, answers per status, seconds waited on
    answers per operation, and up to MAX_FAILURES failures per operation and phase."""

    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    failures: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def fail(self, where: str, exc: BaseException) -> None:
        if len(self.failures[where]) < MAX_FAILURES:
            self.failures[where].append(str(exc))

    def report(self) -> str:
        """Every failure, under its operation and phase."""
        return "\n\n".join(
            f"{where}:\n" + "\n".join(texts) for where, texts in self.failures.items()
        )

    def summary(self) -> str:
        slowest = sorted(self.seconds.items(), key=lambda item: -item[1])[:3]
        return (
            f"{sum(self.calls.values())} requests; {dict(sorted(self.statuses.items()))}; "
            f"seconds waited, most: { {label: round(seconds, 1) for label, seconds in slowest} }"
        )


def coverage_cases(schema: BaseSchema, operation: APIOperation) -> Iterator[schemathesis.Case]:
    """schemathesis' coverage phase for `operation`: each parameter and property at its bounds
    and, for invalid requests, each given a value of every other JSON type, one at a time. The
    configured headers (the key), and the schema's `map_body` and `map_query` hooks, apply to
    them as to generated requests."""
    context = schemathesis.HookContext(operation=operation)
    for case in schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=schema.config.generation_for(operation=operation),
    ):
        case.headers.update(schema.config.headers or {})
        for hook in schema.hooks.applicable("map_body", context):
            case.body = hook(context, case.body)
        if case.query is not None:
            for hook in schema.hooks.applicable("map_query", context):
                case.query = hook(context, case.query)
        yield case


def run_every_operation(
    schema: BaseSchema,
    budget: Callable[[APIOperation], Budget],
    checks: list[CheckFunction],
    coverage: bool = False,
) -> Run:
    """Generated requests, valid and invalid, for every operation of `schema`, each answer held to
    `checks`; `budget` says how many of each mode an operation gets (fewer when its inputs run
    out: one without parameters has a single valid request). With `coverage`, the coverage
    phase's requests first; a failing one does not stop the others."""
    run = Run()

    def holds(case: schemathesis.Case) -> None:
        run.calls[case.operation.label] += 1
        response = case.call_and_validate(checks=checks)
        run.statuses[f"{case.operation.label} {response.status_code}"] += 1
        run.seconds[case.operation.label] += response.elapsed

    for operation in operations(schema):
        for case in coverage_cases(schema, operation) if coverage else ():
            try:
                holds(case)
            except (Exception, BaseExceptionGroup) as exc:
                run.fail(f"{operation.label} (coverage)", exc)
        for mode, examples in budget(operation).items():
            settings_ = settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            try:
                settings_(given(case=operation.as_strategy(generation_mode=mode))(holds))()
            except Unsatisfiable:
                # No invalid request can be written for it (e.g. only a path parameter, and any
                # string is one).
                assert mode == GenerationMode.NEGATIVE
            except (Exception, BaseExceptionGroup) as exc:
                run.fail(f"{operation.label} ({mode.value})", exc)
    return run


# Validates one real answer: its method, Ferry's path template (`/v1/files/{file_id}`), itself.
Holds = Callable[[str, str, httpx.Response], None]


def walk_real_objects(http: httpx.Client, holds: Holds) -> None:
    """Make real objects (a file, a batch made of it, a streamed completion, a stored one, an
    asynchronous one, the usage they add up to) and hand every answer about them to `holds`."""

    def answer(method: str, template: str, response: httpx.Response) -> dict:
        response.request.read()  # multipart requests are streamed; the check reads them
        holds(method, template, response)
        return response.json() if response.headers["content-type"] == "application/json" else {}

    # A file, and a batch made of it that fails at once (its only line is not JSON).
    upload = http.post(
        "/v1/files", files={"file": ("in.jsonl", b"not json\n")}, data={"purpose": "batch"}
    )
    file_id = answer("POST", "/v1/files", upload)["id"]
    answer("GET", "/v1/files", http.get("/v1/files", params={"limit": 2}))
    answer("GET", "/v1/files/{file_id}", http.get(f"/v1/files/{file_id}"))
    answer("GET", "/v1/files/{file_id}/content", http.get(f"/v1/files/{file_id}/content"))
    batch = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}
    batch_id = answer("POST", "/v1/batches", http.post("/v1/batches", json=batch))["id"]
    deadline = time.monotonic() + 30
    while (found := http.get(f"/v1/batches/{batch_id}")).json()["status"] != "failed":
        assert time.monotonic() < deadline, found.text
        time.sleep(0.2)
    answer("GET", "/v1/batches/{batch_id}", found)
    answer("GET", "/v1/batches", http.get("/v1/batches"))
    cancel = http.post(f"/v1/batches/{batch_id}/cancel")
    assert cancel.status_code == 409
    answer("POST", "/v1/batches/{batch_id}/cancel", cancel)

    # A streamed completion, a stored one, then one submitted asynchronously.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    answer("POST", URL, http.post(URL, json={**body, **usage}))
    done = answer("POST", URL, http.post(URL, json={**body, "store": True, "metadata": {"a": "b"}}))
    one = f"{URL}/{done['id']}"
    item = f"{URL}/{{completion_id}}"
    answer("GET", URL, http.get(URL, params={"model": MODEL, "metadata[a]": "b"}))
    answer("GET", item, http.get(one))
    answer("GET", f"{item}/messages", http.get(f"{one}/messages"))
    answer("POST", item, http.post(one, json={"metadata": {"a": "c"}}))
    answer("POST", f"{item}/cancel", http.post(f"{one}/cancel"))
    answer("DELETE", item, http.delete(one))
    queued = http.post(URL, json=body, headers={"Prefer": "respond-async"})
    assert queued.status_code == 202
    answer("GET", item, http.get(f"{URL}/{answer('POST', URL, queued)['id']}"))

    # Usage with those completions in it, grouped (arrays as OpenAI's document writes them).
    usage = "/v1/organization/usage/completions"
    since = {"start_time": int(time.time()) - 3600, "bucket_width": "1h"}
    grouped = http.get(usage, params={**since, "group_by": ["model", "batch", "service_tier"]})
    assert any(bucket["results"] for bucket in answer("GET", usage, grouped)["data"])
    answer("DELETE", "/v1/files/{file_id}", http.delete(f"/v1/files/{file_id}"))
