"""Schemathesis over Ferry's own OpenAPI document, against the running stack.

Every operation of `/openapi.json` gets generated requests, valid and invalid ones; each answer
must be no 5xx, have a documented status and content type, and match the documented schema.

Chat completions are generated for the served model most of the time (a random model name only
tests the 404), so valid ones really run on the worker; what keeps them cheap is a hook that caps
`max_completion_tokens`/`max_tokens` at 2 tokens and `n` at 2, nothing else. Every other field
(streaming, tools, response formats, logprobs, seeds, stops, logit bias) goes through as generated,
so an engine error that became a 5xx would be found. The stack is healthy when it starts (a live
worker, `/readyz` 200), so any 5xx, `no_live_worker` included, is a failure.
"""

import time
import zlib
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.stack import Stack
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e

# Generated examples per operation, valid and invalid ones; fewer when an operation's inputs run
# out (one without parameters has a single valid request).
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
# Chat completions, the operation that matters most, get more.
CHAT_EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 40}
MIN_EXAMPLES = 500
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
URL = "/v1/chat/completions"
CHAT = ("POST", URL)
TOKENS_CAP = 2
REFUSED_HERE = (
    "modalities",
    "audio",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "moderation",
)
CHOICES_CAP = 2


def _cheap(body: Any) -> Any:
    """A generated chat completion request, routed to the served model and kept short."""
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    # One model name in five stays as generated: those test the 404.
    if isinstance(model, str) and zlib.crc32(model.encode()) % 5:
        body["model"] = MODEL
    # Fields this deployment refuses (capabilities its worker does not declare) go from four
    # requests in five, so that the rest of those requests reaches the engine.
    if zlib.crc32(repr(sorted(body)).encode()) % 5:
        for field in REFUSED_HERE:
            body.pop(field, None)
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > TOKENS_CAP:
            body[field] = TOKENS_CAP
    if "max_completion_tokens" not in body and "max_tokens" not in body:
        body["max_completion_tokens"] = TOKENS_CAP
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > CHOICES_CAP:
        body["n"] = CHOICES_CAP
    return body


@pytest.fixture(scope="module")
def api_schema(live_worker: Stack, api_key: str) -> BaseSchema:
    """Ferry's OpenAPI document as the running API serves it, with the suite's key."""
    deadline = time.monotonic() + 60
    while httpx.get(f"{live_worker.base_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the stack is not ready"
        time.sleep(0.5)
    schema = schemathesis.openapi.from_url(f"{live_worker.base_url}/openapi.json")
    schema.config.update(headers={"Authorization": f"Bearer {api_key}"}, request_timeout=120)

    @schema.hook
    def map_body(context: schemathesis.HookContext, body: Any) -> Any:
        operation = context.operation
        if operation is not None and (operation.method.upper(), operation.path) == CHAT:
            return _cheap(body)
        return body

    return schema


def test_openapi_document_holds(api_schema: BaseSchema) -> None:
    calls: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        budget = CHAT_EXAMPLES if (operation.method.upper(), operation.path) == CHAT else EXAMPLES
        for mode, examples in budget.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def holds(case: schemathesis.Case) -> None:
                calls[case.operation.label] += 1
                response = case.call_and_validate(checks=CHECKS)
                statuses[f"{case.operation.label} {response.status_code}"] += 1

            try:
                holds()
            except Unsatisfiable:
                # No invalid request can be written for it (e.g. only a path parameter, and any
                # string is one).
                assert mode == GenerationMode.NEGATIVE
            except (Exception, BaseExceptionGroup) as exc:
                failures[f"{operation.label} ({mode.value})"] = str(exc)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    print(f"schemathesis: {sum(calls.values())} requests;", dict(sorted(statuses.items())))
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert set(calls) == labels, f"never called: {sorted(labels - set(calls))}"
    assert sum(calls.values()) >= MIN_EXAMPLES, dict(calls)


def test_real_objects_match_the_document(api_schema: BaseSchema, http: httpx.Client) -> None:
    """What generated requests rarely reach (ids that exist, finished batches, stored
    completions), walked once and held to the same document."""

    def holds(method: str, path: str, response: httpx.Response, template: str = "") -> dict:
        operation = api_schema[template or path][method]
        response.request.read()  # multipart requests are streamed; the check reads them
        operation.validate_response(response)
        return response.json() if response.headers["content-type"] == "application/json" else {}

    # A file, and a batch made of it that fails at once (its only line is not JSON).
    upload = http.post(
        "/v1/files", files={"file": ("in.jsonl", b"not json\n")}, data={"purpose": "batch"}
    )
    file_id = holds("POST", "/v1/files", upload)["id"]
    holds("GET", "/v1/files", http.get("/v1/files", params={"limit": 2}))
    holds("GET", "/v1/files/{file_id}", http.get(f"/v1/files/{file_id}"), "/v1/files/{file_id}")
    content = http.get(f"/v1/files/{file_id}/content")
    holds("GET", "/v1/files/{file_id}/content", content, "/v1/files/{file_id}/content")
    batch = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}
    batch_id = holds("POST", "/v1/batches", http.post("/v1/batches", json=batch))["id"]
    deadline = time.monotonic() + 30
    while (found := http.get(f"/v1/batches/{batch_id}")).json()["status"] != "failed":
        assert time.monotonic() < deadline, found.text
        time.sleep(0.2)
    holds("GET", "/v1/batches/{batch_id}", found, "/v1/batches/{batch_id}")
    holds("GET", "/v1/batches", http.get("/v1/batches"))
    cancel = http.post(f"/v1/batches/{batch_id}/cancel")
    assert cancel.status_code == 409
    holds("POST", "/v1/batches/{batch_id}/cancel", cancel, "/v1/batches/{batch_id}/cancel")

    # A stored completion, then one submitted asynchronously.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    done = holds("POST", URL, http.post(URL, json={**body, "store": True, "metadata": {"a": "b"}}))
    one = f"{URL}/{done['id']}"
    item = "/v1/chat/completions/{completion_id}"
    holds("GET", URL, http.get(URL, params={"model": MODEL, "metadata[a]": "b"}))
    holds("GET", item, http.get(one), item)
    holds("GET", f"{item}/messages", http.get(f"{one}/messages"), f"{item}/messages")
    holds("POST", item, http.post(one, json={"metadata": {"a": "c"}}), item)
    holds("POST", f"{item}/cancel", http.post(f"{one}/cancel"), f"{item}/cancel")
    holds("DELETE", item, http.delete(one), item)
    queued = http.post(URL, json=body, headers={"Prefer": "respond-async"})
    assert queued.status_code == 202
    holds("GET", item, http.get(f"{URL}/{holds('POST', URL, queued)['id']}"), item)
    holds(
        "DELETE", "/v1/files/{file_id}", http.delete(f"/v1/files/{file_id}"), "/v1/files/{file_id}"
    )
