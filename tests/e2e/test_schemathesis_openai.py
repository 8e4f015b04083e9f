"""Schemathesis driven by OpenAI's own OpenAPI document (`docs/openai-openapi.yaml`), restricted
to the operations Ferry serves, against the running stack.

Ferry's own document says what Ferry means to answer; OpenAI's says what OpenAI's clients may
send, and reaches what Ferry's never would (a content part whose `type` is an object, a bare
`metadata=` query). Every operation gets schemathesis' coverage phase (each parameter and property
at its bounds and, one at a time, of every other JSON type) and then generated requests, valid
and invalid. Each answer must be no 5xx; an error must come in OpenAI's envelope; a request
OpenAI's document forbids must not be accepted; a 200 must match OpenAI's schema for it. OpenAI's
document declares no error statuses, so a 4xx is not held to a documented one: Ferry refuses on
purpose what this deployment cannot do (README, "Every request field").

Chat completions are kept cheap by the same hook as the run on Ferry's document
(`tests/fuzzing.py`). OpenAI's schemas do not close their objects, so most generated bodies carry
made-up fields, which Ferry, like OpenAI, refuses as `unknown_parameter`; four bodies in five lose
them here, so that the rest of those requests reaches the checks behind.
"""

import re
import zlib
from typing import Any, get_args

import httpx
import pytest
import schemathesis
from schemathesis import APIOperation, BaseSchema, GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from bench.stack import Stack
from core.wire.messages import ChatMessage
from core.wire.requests import ChatCompletionRequest
from tests.fuzzing import (
    Budget,
    cap_chat_completions,
    is_chat,
    operations,
    run_every_operation,
    wait_until_ready,
    walk_real_objects,
)
from tests.openai_schema import load_spec, validate

pytestmark = pytest.mark.e2e

CHAT = "/chat/completions"  # OpenAI's paths are relative to its server URL, which ends in /v1
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
CHAT_EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 100}
MIN_EXAMPLES = 1500
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
REQUEST_FIELDS = set(ChatCompletionRequest.model_fields)
MESSAGE_FIELDS = {
    field for role in get_args(get_args(ChatMessage)[0]) for field in role.model_fields
}
# `GET /chat/completions`' own parameters; OpenAI declares `metadata` a form-exploded object, so
# schemathesis sends its pairs as bare parameters.
LIST_PARAMETERS = {"model", "metadata", "after", "limit", "order"}

# Where OpenAI's document is wrong about OpenAI's own answers, and why.
ERRATA = {
    # Each message is typed `ChatCompletionResponseMessage`, whose role can only be `assistant`;
    # they are the request's messages, of every role (OpenAI answers `user` ones too).
    ("GET", "/chat/completions/{completion_id}/messages"),
}


def error_envelope(ctx: CheckContext, response: Response, case: schemathesis.Case) -> None:
    """Every error comes in OpenAI's envelope, typed by its status."""
    if response.status_code < 400:
        return
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    kind = "invalid_request_error" if response.status_code < 500 else "server_error"
    assert body["error"]["type"] == kind, body


CHECKS = [
    not_a_server_error,
    error_envelope,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _template(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def _events(data: dict[str, Any]) -> dict[str, Any]:
    """An event of a stream whose data is `data` as JSON, or the last one, `[DONE]`."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


def served_operations(spec: dict[str, Any], ferry: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's document with only the operations Ferry's document (`ferry`) also has.

    OpenAI's `text/event-stream` schemas describe each event's data; schemathesis holds the event
    itself to them (OpenAPI 3.2's reading), so they are rewritten as events carrying that data.
    """
    served = {(method, _template(path)) for path, item in ferry["paths"].items() for method in item}
    paths = {}
    for path, item in spec["paths"].items():
        kept = {
            method: operation
            for method, operation in item.items()
            if method in METHODS and (method, _template(f"/v1{path}")) in served
        }
        for operation in kept.values():
            for response in operation.get("responses", {}).values():
                stream = response.get("content", {}).get("text/event-stream")
                if stream is not None and "schema" in stream:
                    stream["schema"] = _events(stream["schema"])
        if kept:
            paths[path] = {**{k: v for k, v in item.items() if k not in METHODS}, **kept}
    return {**spec, "paths": paths}


def tagged_usage_results(spec: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's document with its usage results' tags mapped to their schemas.

    A bucket's results are a union tagged by `object` that names no mapping, so OpenAPI reads each
    tag as a schema's name (`UsageCompletionsResult`); OpenAI answers with the `object` value each
    member declares (`organization.usage.completions.result`, its own example's), mapped here.
    """
    schemas = spec["components"]["schemas"]
    results = schemas["UsageTimeBucket"]["properties"]["results"]["items"]
    tag = results["discriminator"]["propertyName"]
    mapping = {}
    for member in results["oneOf"]:
        declared = schemas[member["$ref"].rsplit("/", 1)[-1]]["properties"][tag]["enum"]
        mapping[declared[0]] = member["$ref"]
    results["discriminator"]["mapping"] = mapping
    return spec


def known_fields_only(body: Any) -> Any:
    """Four bodies in five without the fields neither OpenAI nor Ferry know, in the request and
    in its messages."""
    if not isinstance(body, dict) or not zlib.crc32(repr(sorted(body)).encode()) % 5:
        return body
    body = {k: v for k, v in body.items() if k in REQUEST_FIELDS}
    if isinstance(body.get("messages"), list):
        body["messages"] = [
            {k: v for k, v in m.items() if k in MESSAGE_FIELDS} if isinstance(m, dict) else m
            for m in body["messages"]
        ]
    return body


def budget(operation: APIOperation) -> Budget:
    return CHAT_EXAMPLES if is_chat(operation, CHAT) else EXAMPLES


@pytest.fixture(scope="module")
def openai_schema(live_worker: Stack, api_key: str) -> BaseSchema:
    """OpenAI's document, restricted to what Ferry serves, aimed at the stack with the suite's
    key."""
    wait_until_ready(live_worker.base_url)
    ferry = httpx.get(f"{live_worker.base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(
        served_operations(tagged_usage_results(load_spec()), ferry)
    )
    schema.config.update(
        base_url=f"{live_worker.base_url}/v1",
        headers={"Authorization": f"Bearer {api_key}"},
        request_timeout=120,
    )
    cap_chat_completions(schema, CHAT, known_fields_only)

    @schema.hook
    def map_query(context: schemathesis.HookContext, query: dict[str, Any]) -> dict[str, Any]:
        """A generated metadata filter's pairs, sent bare, as `metadata[key]=value`."""
        operation = context.operation
        if operation is None or (operation.method.upper(), operation.path) != ("GET", CHAT):
            return query
        return {k if k in LIST_PARAMETERS else f"metadata[{k}]": v for k, v in query.items()}

    return schema


def test_openai_document_finds_no_server_error(openai_schema: BaseSchema) -> None:
    run = run_every_operation(openai_schema, budget, CHECKS, coverage=True)
    assert not run.failures, run.report()
    print("schemathesis (OpenAI's document):", run.summary())
    labels = {operation.label for operation in operations(openai_schema)}
    assert f"POST {CHAT}" in labels, sorted(labels)
    assert set(run.calls) == labels, f"never called: {sorted(labels - set(run.calls))}"
    assert sum(run.calls.values()) >= MIN_EXAMPLES, dict(run.calls)


def test_real_objects_match_openais_document(openai_schema: BaseSchema, http: httpx.Client) -> None:
    """Real files, batches and completions (streamed, stored, asynchronous), held to OpenAI's
    schemas where OpenAI's document has the operation (it has no cancel for a chat completion)
    and the status."""
    labels = {operation.label for operation in operations(openai_schema)}

    def holds(method: str, template: str, response: httpx.Response) -> None:
        path = template.removeprefix("/v1")
        if f"{method} {path}" in labels and (method, path) not in ERRATA:
            openai_schema[path][method].validate_response(response)

    walk_real_objects(http, holds)
