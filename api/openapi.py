"""The OpenAPI document as the API really answers: what FastAPI writes, less what it gets wrong.

FastAPI declares 422 with its own validation body on every route with parameters; Ferry answers
400 in OpenAI's envelope instead. Every route with a body may also answer 413, every `/v1`
route takes a bearer key, and /metrics a scrape token.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
}
_FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    for name in _FASTAPI_ONLY:
        components.get("schemas", {}).pop(name, None)
    components["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key."},
        "scrapeToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The API's FERRY_METRICS_TOKEN.",
        },
    }
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            validates = responses.pop("422", None) is not None
            if validates or "requestBody" in operation:
                responses.setdefault("400", {"description": "Invalid request", **_ERROR})
            if "requestBody" in operation:
                responses.setdefault("413", {"description": "Request body too large", **_ERROR})
            if path == "/metrics":
                operation["security"] = [{"scrapeToken": []}]
            if path.startswith("/v1/"):
                operation["security"] = [{"bearerAuth": []}]
                responses.setdefault("401", {"description": "Missing or invalid API key", **_ERROR})
    app.openapi_schema = doc
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `document` at the app's OpenAPI URL."""
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
