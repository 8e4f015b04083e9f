"""Schemathesis over Ferry's own OpenAPI document, against the running stack.

Every operation of `/openapi.json` gets generated requests, valid and invalid ones; each answer
must be no 5xx, have a documented status and content type, and match the documented schema.

Chat completions are generated for the served model most of the time (a random model name only
tests the 404), so valid ones really run on the worker; what keeps them cheap is a hook that caps
`max_completion_tokens`/`max_tokens` at 2 tokens and `n` at 2, nothing else (`tests/fuzzing.py`).
Every other field (streaming, tools, response formats, logprobs, seeds, stops, logit bias) goes
through as generated, so an engine error that became a 5xx would be found. The stack is healthy
when it starts (a live worker, `/readyz` 200), so any 5xx, `no_live_worker` included, is a failure.
"""

import httpx
import pytest
import schemathesis
from schemathesis import APIOperation, BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.stack import Stack
from tests import fuzzing

pytestmark = pytest.mark.e2e

# Generated examples per operation, valid and invalid ones.
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


def budget(operation: APIOperation) -> fuzzing.Budget:
    return CHAT_EXAMPLES if fuzzing.is_chat(operation, fuzzing.URL) else EXAMPLES


@pytest.fixture(scope="module")
def api_schema(live_worker: Stack, api_key: str) -> BaseSchema:
    """Ferry's OpenAPI document as the running API serves it, with the suite's key."""
    fuzzing.wait_until_ready(live_worker.base_url)
    schema = schemathesis.openapi.from_url(f"{live_worker.base_url}/openapi.json")
    schema.config.update(headers={"Authorization": f"Bearer {api_key}"}, request_timeout=120)
    fuzzing.cap_chat_completions(schema, fuzzing.URL)
    return schema


def test_openapi_document_holds(api_schema: BaseSchema) -> None:
    run = fuzzing.run_every_operation(api_schema, budget, CHECKS)
    assert not run.failures, run.report()
    print("schemathesis:", run.summary())
    labels = {operation.label for operation in fuzzing.operations(api_schema)}
    assert set(run.calls) == labels, f"never called: {sorted(labels - set(run.calls))}"
    assert sum(run.calls.values()) >= MIN_EXAMPLES, dict(run.calls)


def test_real_objects_match_the_document(api_schema: BaseSchema, http: httpx.Client) -> None:
    """What generated requests rarely reach (ids that exist, finished batches, stored
    completions), walked once and held to the same document."""

    def holds(method: str, template: str, response: httpx.Response) -> None:
        api_schema[template][method].validate_response(response)

    fuzzing.walk_real_objects(http, holds)
