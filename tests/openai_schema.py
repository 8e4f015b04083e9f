"""Validate JSON instances against the component schemas of OpenAI's OpenAPI document."""

import hashlib
import json
import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, relevance
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "openai-openapi.yaml"
CACHE_DIR = ROOT / ".pytest_cache"
CACHE_VERSION = 1  # bump when to_json_schema changes, so cached documents are rebuilt
BASE_URI = "urn:openai-openapi"
MAX_ERRORS = 5

_SUBSCHEMA = (
    "items",
    "additionalProperties",
    "not",
    "contains",
    "propertyNames",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs")
_COMBINATORS = frozenset({"$ref", "$dynamicRef", "allOf", "anyOf", "oneOf", "not", "const", "if"})


def _is_nullable(schema: dict[str, Any]) -> bool:
    """Whether OpenAPI 3.0 marks the schema nullable, directly or via an allOf member."""
    members = schema.get("allOf", [])
    return schema.get("nullable") is True or any(
        isinstance(m, dict) and m.get("nullable") is True for m in members
    )


def to_json_schema(schema: Any) -> Any:
    """Turn one OpenAPI schema object (and its subschemas) into plain JSON Schema 2020-12."""
    if not isinstance(schema, dict):
        return schema
    nullable = _is_nullable(schema)
    out = {k: v for k, v in schema.items() if k != "nullable"}
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = to_json_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if key in out:
            out[key] = [to_json_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if key in out:
            out[key] = {name: to_json_schema(s) for name, s in out[key].items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
            out[exclusive] = out.pop(bound)  # OpenAPI 3.0 boolean form
    if not nullable:
        return out
    if "type" not in out or not _COMBINATORS.isdisjoint(out):
        return {"anyOf": [out, {"type": "null"}]}
    types = out["type"] if isinstance(out["type"], list) else [out["type"]]
    out["type"] = [*types, "null"] if "null" not in types else types
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def load_spec() -> dict[str, Any]:
    """The whole OpenAPI document as parsed from its YAML (a new copy on each call)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open("rb") as f:
        return yaml.load(f, Loader=loader)


def _build(cache_file: Path) -> dict[str, Any]:
    """Parse the YAML spec, convert its schemas and write them to the cache file."""
    spec = load_spec()
    schemas = {name: to_json_schema(s) for name, s in spec["components"]["schemas"].items()}
    converted = {"components": {"schemas": schemas}}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(converted, default=str))  # default=str: YAML dates in examples
    os.replace(tmp, cache_file)
    for old in CACHE_DIR.glob("openai-openapi-*.json"):
        if old != cache_file:
            old.unlink(missing_ok=True)
    return converted


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The converted spec ({"components": {"schemas": ...}}), from the cache file if fresh."""
    digest = hashlib.sha256(SPEC.read_bytes()).hexdigest()
    cache_file = CACHE_DIR / f"openai-openapi-{digest}-v{CACHE_VERSION}.json"
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return _build(cache_file)


@lru_cache(maxsize=1)
def _registry() -> Registry:
    """A registry holding the converted spec under BASE_URI."""
    return Registry().with_resource(BASE_URI, DRAFT202012.create_resource(document()))


@cache
def validator(component: str) -> Draft202012Validator:
    """A validator (format checking off) for #/components/schemas/<component>."""
    if component not in document()["components"]["schemas"]:
        raise KeyError(f"no component schema {component!r} in {SPEC.name}")
    schema = {"$ref": f"{BASE_URI}#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=_registry(), format_checker=None)


def _describe(error: ValidationError) -> str:
    """One line: the instance's JSON path, the failing keyword and the (shortened) message."""
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    return f"{error.json_path}: [{error.validator}] {message}"


def validate(component: str, instance: object) -> None:
    """Raise AssertionError listing the errors (best first) if instance is not a <component>."""
    errors = sorted(validator(component).iter_errors(instance), key=relevance, reverse=True)
    if not errors:
        return
    lines = [f"not a valid {component} ({len(errors)} error(s)):"]
    for error in errors[:MAX_ERRORS]:
        lines.append(f"  - {_describe(error)}")
        cause = error
        while cause.context:  # descend into the closest anyOf/oneOf alternative
            cause = min(cause.context, key=relevance)
        if cause is not error:
            lines.append(f"      most likely: {_describe(cause)}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    raise AssertionError("\n".join(lines))


def clear_caches() -> None:
    """Forget the in-process document, registry and validators."""
    for cached in (document, _registry, validator):
        cached.cache_clear()
