"""Problems found in a routing table document, and how they read (SPEC §3).

A problem is `(path, message)`: `path` a location in the document (str keys, int list indices).
`render` turns them into the sorted, de-duplicated `dotted.path: message` lines of `TableInvalid`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from jsonschema import ValidationError

ROOT = "(document)"  # how a problem with the whole document names its path
RESERVED_ENV = "development"
PRODUCTION = "production"

DocPath = tuple[Any, ...]  # a location in the document: str keys and int list indices

Problem = tuple[DocPath, str]


class TableInvalid(Exception):
    """The document is not a valid routing table; `problems` lists every reason, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- schema errors as messages ---------------------------------------------------------------------

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "null": "null",
}


def schema_message(error: ValidationError, path: DocPath, is_key: bool) -> list[Problem]:
    kind, value, x = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties" and value is False:
        allowed = list(error.schema.get("properties", {}))
        return [(path + (k,), _unknown_key(k, allowed)) for k in x if k not in error.schema.get("properties", {})]
    if kind == "required":
        return [(path + (k,), _missing_key(k, path)) for k in value if k not in x]
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        expected = " or ".join(_TYPE_NAMES.get(t, t) for t in types) + (" key" if is_key else "")
        hint = ""
        if "string" in types and isinstance(x, (bool, int, float)):
            hint = " (YAML read it as a number or boolean; quote it)"
        elif "object" in types and x is None:
            hint = " (write {} for an empty mapping)"
        return [(path, f"expected {expected}, got {_describe(x)}{hint}")]
    return [(path, _value_message(error))]


def _value_message(error: ValidationError) -> str:
    kind, value, x = error.validator, error.validator_value, error.instance
    description = error.schema.get("description")
    if kind in ("pattern", "maxLength") and description:
        return f"{quote(x)} is not {description}"
    messages: dict[str, Callable[[], str]] = {
        "const": lambda: f"must be {value!r}, got {_describe(x)}",
        "enum": lambda: f"{quote(x)} is not one of: {', '.join(map(str, value))}",
        "minimum": lambda: f"must be at least {value}, got {_clip(repr(x))}",
        "maximum": lambda: f"must be at most {value}, got {_clip(repr(x))}",
        "exclusiveMinimum": lambda: f"must be greater than {value}, got {_clip(repr(x))}",
        "minItems": lambda: "must not be empty" if value == 1 else f"needs at least {value} items",
        "minProperties": lambda: "must not be empty" if value == 1 else f"needs at least {value} keys",
        "minLength": lambda: "must not be empty" if value == 1 else f"must be at least {value} characters",
        "maxLength": lambda: f"is too long (at most {value} characters)",
        "uniqueItems": lambda: f"lists {', '.join(quote(d) for d in _duplicates(x)) or 'an item'} more than once",
        "pattern": lambda: f"{quote(x)} does not have the expected form",
    }
    make = messages.get(str(kind))
    return make() if make is not None else error.message


def _unknown_key(key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {quote(close[0])}?" if close else f"allowed: {', '.join(allowed)}"
    return f"unknown key {quote(key)} ({hint})"


def _missing_key(key: str, path: DocPath) -> str:
    if key == PRODUCTION and path[-1:] == ("environments",):
        return "missing: every model needs a 'production' environment"
    return f"required key {quote(key)} is missing"


def _duplicates(items: list[Any]) -> list[Any]:
    seen: list[Any] = []
    dups: list[Any] = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.append(item)
    return dups


def _describe(x: Any) -> str:
    if x is None:
        return "null (nothing)"
    if isinstance(x, bool):
        return f"the boolean {str(x).lower()}"
    if isinstance(x, int):
        return f"the integer {x}"
    if isinstance(x, float):
        return f"the number {x}" if math.isfinite(x) else f"the non-finite number {x}"
    if isinstance(x, str):
        return f"the string {quote(x)}"
    if isinstance(x, dict):
        return "a mapping"
    if isinstance(x, list):
        return "a list"
    return f"a value of type {type(x).__name__} ({_clip(repr(x))})"


def quote(x: Any) -> str:
    """Quote a user-supplied value for a one-line message."""
    if isinstance(x, str) and x.isprintable() and "'" not in x:
        return f"'{_clip(x)}'"
    return _clip(repr(x))


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- rendering problems ----------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _format_path(path: DocPath) -> str:
    out: list[str] = []
    for seg in path:
        if isinstance(seg, int) and not isinstance(seg, bool):
            out.append(f"[{seg}]")
        elif isinstance(seg, str) and _PLAIN_KEY.match(seg):
            out.append(f".{seg}" if out else seg)
        else:  # a key that would make the dotted path ambiguous: models["a.b"]
            out.append(f"[{json.dumps(seg, ensure_ascii=False) if isinstance(seg, str) else repr(seg)}]")
    return "".join(out) or ROOT


def sort_key(problem: Problem) -> tuple[Any, ...]:
    path, message = problem
    segs = tuple(
        (1, "", seg)
        if isinstance(seg, int) and not isinstance(seg, bool)
        else (0, seg if isinstance(seg, str) else repr(seg), 0)
        for seg in path
    )
    return segs, message


def render(problems: Iterable[Problem]) -> list[str]:
    unique = {(tuple(path), message) for path, message in problems}
    return [f"{_format_path(path)}: {message}" for path, message in sorted(unique, key=sort_key)]
