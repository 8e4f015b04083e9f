"""Pydantic's validation errors in OpenAI's words: a message, the field's path as OpenAI writes it
(`messages[0].content[1].type`) and OpenAI's code (`invalid_value`, `invalid_type`,
`missing_required_parameter`, `unknown_parameter`...).

The API (request bodies, batch lines) and the workers (vLLM's own parse) word errors here alike.
Given the type that was validated, a path is found by walking it, so that the tags of
discriminated unions and the labels of plain ones, which pydantic puts in its locations, are
left out; without it, by the labels' look.
"""

import re
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from core.errors import InvalidRequestError

# Pydantic's names for union members, which are not part of a field's path.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}
_KEY = "[key]"
# Where a path goes one level down: into a field or an item (the first field has no dot).
_SEGMENT = re.compile(r"[.[]")
_JSON_HINT = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)
# Pydantic's bound errors: OpenAI's words, the bound's key in the error's context, sign, code.
_BOUNDS = {
    "less_than_equal": ("above maximum", "le", "<=", "above_max_value"),
    "less_than": ("above maximum", "lt", "<", "above_max_value"),
    "greater_than_equal": ("below minimum", "ge", ">=", "below_min_value"),
    "greater_than": ("below minimum", "gt", ">", "below_min_value"),
}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _unwrap(tp: Any) -> tuple[Any, str | None]:
    """`tp` without Annotated and None, and the field that tags it if it is a tagged union."""
    tag = None
    while True:
        if get_origin(tp) is Annotated:
            tag = next(
                (m.discriminator for m in tp.__metadata__ if getattr(m, "discriminator", None)), tag
            )
            tp = get_args(tp)[0]
        elif _is_union(tp) and type(None) in get_args(tp):
            rest = tuple(arg for arg in get_args(tp) if arg is not type(None))
            tp = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
        else:
            return tp, tag


def _label(member: Any) -> str:
    """The start of the name pydantic gives `member` of a plain union in a location."""
    inner, tag = _unwrap(member)
    if tag is not None:
        return "tagged-union"
    origin = get_origin(inner)
    return "literal" if origin is Literal else getattr(origin or inner, "__name__", "?")


def _child(tp: Any, part: str) -> Any:
    """The type of field or key `part` of `tp`; None if not known."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = next((f for name, f in tp.model_fields.items() if part in (name, f.alias)), None)
        if field is None:
            return None
        return Annotated[field.annotation, field] if field.discriminator else field.annotation
    return get_args(tp)[1] if get_origin(tp) is dict else None


def param_path(loc: Iterable[Any], root: Any = None) -> str | None:
    """`('messages', 2, 'role')` as OpenAI writes it: `messages[2].role`; `root` is the type
    validated."""
    path, tp = "", root
    for part in loc:
        tp, tag = _unwrap(tp)
        if isinstance(part, int):
            path += f"[{part}]"
            tp = get_args(tp)[0] if get_origin(tp) is list else None
        elif tag is not None:
            tp = next(
                (m for m in get_args(tp) if get_args(m.model_fields[tag].annotation) == (part,)),
                None,
            )
        elif _is_union(tp):
            tp = next((m for m in get_args(tp) if part.split("[")[0] == _label(m)), None)
        elif part == _KEY or (tp is None and ("[" in part or part.lower() in _TYPE_TAGS)):
            continue
        else:
            path += f".{part}" if path else part
            tp = _child(tp, part)
    return path or None


def _json_type(value: Any) -> str:
    """What a parsed JSON value is, as OpenAI names it in its messages ("an object")."""
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "an array"))
    if value is None:
        return "null"
    return next((name for kind, name in kinds if isinstance(value, kind)), "an object")


def describe(error: Mapping[str, Any], root: Any = None) -> tuple[str, str | None, str | None]:
    """One pydantic error as OpenAI's (message, param, code)."""
    kind, loc = error["type"], tuple(error["loc"])
    param = param_path(loc, root)
    value = error.get("input")
    ctx = error.get("ctx") or {}
    where = f"'{param}'" if param else "request body"
    if "param" in ctx:
        # A model's rule across fields (`core.wire.requests.refusal`): its own words and code.
        return error["msg"], ".".join(p for p in (param, ctx["param"]) if p), kind
    if kind == "json_invalid":
        return _JSON_HINT, None, None
    if kind in ("missing", "union_tag_not_found"):
        if kind != "missing":
            param = ".".join(p for p in (param, ctx["discriminator"].strip("'")) if p)
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if loc[-1:] == (_KEY,):
        parent = param_path(loc[:-2], root)
        if kind == "string_too_long":
            return (
                f"Invalid '{parent}': key too long. Expected a key with maximum length "
                f"{ctx.get('max_length')}, but got a key with length {len(str(value))} instead.",
                param,
                "string_above_max_length",
            )
        return f"Invalid key in '{parent}': {value!r}. {error['msg']}.", param, "invalid_type"
    if kind in ("union_tag_invalid", "literal_error"):
        if kind == "union_tag_invalid":
            tag = ctx["discriminator"].strip("'")
            param = ".".join(p for p in (param, tag) if p)
            value = value.get(tag) if isinstance(value, dict) else value
            expected = ctx["expected_tags"]
        else:
            expected = ctx.get("expected", "")
        if not isinstance(value, str):
            return (
                f"Invalid type for '{param}': expected one of {expected}, but got "
                f"{_json_type(value)} instead.",
                param,
                "invalid_type",
            )
        return (
            f"Invalid value for '{param}': {value!r}. Supported values are: {expected}.",
            param,
            "invalid_value",
        )
    if kind in _BOUNDS:
        words, key, sign, suffix = _BOUNDS[kind]
        limit = ctx.get(key)
        number = "integer" if type(limit) is int else "decimal"
        return (
            f"Invalid {where}: {number} {words} value. "
            f"Expected a value {sign} {limit:g}, but got {value} instead.",
            param,
            f"{number}_{suffix}",
        )
    if kind == "too_short":
        if ctx.get("min_length") == 1 and not value:
            return (
                f"Invalid {where}: empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                param,
                "empty_array",
            )
        return (
            f"Invalid {where}: array too short. Expected an array with minimum length "
            f"{ctx.get('min_length')}, but got an array with length {len(value or [])} instead.",
            param,
            "array_below_min_length",
        )
    if kind == "too_long" and isinstance(value, dict):
        return (
            f"Invalid {where}: too many properties. Expected an object with at most "
            f"{ctx.get('max_length')} properties, but got an object with {len(value)} "
            "properties instead.",
            param,
            "object_above_max_properties",
        )
    if kind == "too_long":
        return (
            f"Invalid {where}: array too long. Expected an array with maximum length "
            f"{ctx.get('max_length')}, but got an array with length {len(value or [])} instead.",
            param,
            "array_above_max_length",
        )
    if kind == "string_too_long":
        return (
            f"Invalid {where}: string too long. Expected a string with maximum length "
            f"{ctx.get('max_length')}, but got a string with length {len(value or '')} instead.",
            param,
            "string_above_max_length",
        )
    if kind == "string_too_short":
        return f"Invalid {where}: string too short. {error['msg']}.", param, "string_too_short"
    if kind == "string_pattern_mismatch":
        return (
            f"Invalid {where}: {value!r} does not match the pattern {ctx.get('pattern')!r}.",
            param,
            "invalid_value",
        )
    if kind == "enum":
        return f"Invalid value for {where}: {value!r}. {error['msg']}.", param, "invalid_value"
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None, "invalid_type"
    return f"Invalid type for {where}: {error['msg'].lower()}.", param, "invalid_type"


def refused(
    errors: ValidationError | Iterable[Mapping[str, Any]], root: Any = None
) -> InvalidRequestError:
    """The error that says most among `errors` (each member of a union reports its own), in
    OpenAI's words: one about the deepest object reached, not a mere type mismatch if it can
    (`stop` too long as a list, rather than "not a string"), the first of its object's."""
    found = errors.errors() if isinstance(errors, ValidationError) else list(errors)
    if not found:
        return InvalidRequestError("Invalid request.")

    def says(error: Mapping[str, Any]) -> tuple[int, bool]:
        _, param, _ = describe(error, root)
        return len(_SEGMENT.findall(param or "")), not error["type"].endswith("_type")

    message, param, code = describe(max(found, key=says), root)
    return InvalidRequestError(message, param=param, code=code)
