"""Structural validation: the JSON Schema (`schema.json`: structure and unknown keys).

`jsonschema` walks about 30,000 nodes a second here, far too slow for 100,000 models, so the schema is
also compiled into plain predicates (`_Gate`) that only answer "certainly valid?". jsonschema then
explains just the subtrees the predicates reject; the gate may reject more than jsonschema (it is
stricter about Python types) but never less, which `tests/test_table_loader.py` checks by property.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators

from gateway.routing.problems import DocPath, Problem, schema_message

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def _number_is_finite(checker: Any, instance: Any) -> bool:
    # NaN passes every `minimum`/`maximum` comparison, so it must not count as a number at all.
    return Draft202012Validator.TYPE_CHECKER.is_type(instance, "number") and math.isfinite(instance)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _ecma_regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262, where `$` is the end of the input. Python's `$` also matches
    # before a final newline, which would let "prod\n" pass as an environment name.
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        ecma = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
        compiled = _PATTERNS[pattern] = re.compile(ecma)
    return compiled


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(
    Draft202012Validator,
    validators={"pattern": _pattern_keyword},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _number_is_finite),
)

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_bytes())
_Validator.check_schema(SCHEMA)
_DEFS: dict[str, Any] = SCHEMA["$defs"]
DOC_VALIDATOR = _Validator(SCHEMA)


def _ref_validator(schema: Any) -> Any:
    """A validator for `{"$ref": "#/$defs/x"}`, or None if `schema` is anything else."""
    if isinstance(schema, dict) and set(schema) == {"$ref"}:
        return _Validator({"$defs": _DEFS, "$ref": schema["$ref"]})
    return None


def _collections() -> dict[str, tuple[str, Any, Any]]:
    """Top-level maps and lists of one item schema -> (kind, key validator, item validator).

    These can hold 100,000 entries: a bad entry is explained with its own validator instead of
    walking the whole document with jsonschema.
    """
    found: dict[str, tuple[str, Any, Any]] = {}
    for key, sub in SCHEMA["properties"].items():
        rest = {k: v for k, v in sub.items() if k not in ("description", "title")}
        if set(rest) == {"type", "propertyNames", "additionalProperties"} and rest["type"] == "object":
            names, items = _ref_validator(rest["propertyNames"]), _ref_validator(rest["additionalProperties"])
            if names is not None and items is not None:
                found[key] = ("object", names, items)
        elif set(rest) == {"type", "items"} and rest["type"] == "array":
            items = _ref_validator(rest["items"])
            if items is not None:
                found[key] = ("array", None, items)
    return found


COLLECTIONS = _collections()


class _Gate:
    """The schema compiled into predicates: True means certainly valid (see the module docstring)."""

    KNOWN = frozenset(
        {
            "$schema",
            "$id",
            "$defs",
            "$ref",
            "title",
            "description",
            "type",
            "const",
            "enum",
            "properties",
            "required",
            "additionalProperties",
            "propertyNames",
            "minProperties",
            "items",
            "minItems",
            "uniqueItems",
            "pattern",
            "minLength",
            "maxLength",
            "minimum",
            "maximum",
            "exclusiveMinimum",
        }
    )

    def __init__(self, root: dict[str, Any]) -> None:
        self.schemas: dict[str, Any] = root["$defs"]
        self.defs: dict[str, Callable[[Any], bool]] = {}
        self.compiling: set[str] = set()
        for name in self.schemas:
            self.ref(name)
        self.root = self.compile(root)
        # (key predicate, item predicate) of each top-level collection, for structural_problems
        self.root_parts: dict[str, tuple[Callable[[Any], bool], Callable[[Any], bool]]] = {}
        for key, sub in root["properties"].items():
            names, items = sub.get("propertyNames"), sub.get("additionalProperties", sub.get("items"))
            if isinstance(items, dict):
                self.root_parts[key] = (self.compile(names) if names else lambda x: True, self.compile(items))

    def ref(self, name: str) -> Callable[[Any], bool]:
        if name in self.compiling:  # a recursive definition: look it up at call time
            return lambda x: self.defs[name](x)
        if name not in self.defs:
            self.compiling.add(name)
            self.defs[name] = self.compile(self.schemas[name])
            self.compiling.discard(name)
        return self.defs[name]

    def compile(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        unknown = set(schema) - self.KNOWN
        if unknown:
            raise RuntimeError(f"schema keyword(s) {sorted(unknown)} unsupported by loader._Gate")
        checks: list[Callable[[Any], bool]] = []
        if "$ref" in schema:
            checks.append(self.ref(schema["$ref"].removeprefix("#/$defs/")))
        kind = schema.get("type")
        typed = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "number": self._number,
            "integer": self._number,
            "boolean": self._boolean,
        }
        if kind is not None:
            checks.append(typed[kind](schema))
        elif set(schema) & {"properties", "items", "pattern", "minimum", "maximum", "minLength"}:
            raise RuntimeError("loader._Gate needs a `type` next to type-specific keywords")
        if "enum" in schema:
            options = frozenset(schema["enum"])
            checks.append(lambda x: type(x) is str and x in options)
        if "const" in schema:
            const = schema["const"]
            checks.append(lambda x: type(x) is type(const) and x == const)
        if not checks:
            return lambda x: True
        if len(checks) == 1:
            return checks[0]
        if len(checks) == 2:
            first, second = checks
            return lambda x: first(x) and second(x)
        return lambda x: all(check(x) for check in checks)

    def _object(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        props = {key: self.compile(sub) for key, sub in schema.get("properties", {}).items()}
        required = tuple(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        extra_check = self.compile(extra) if isinstance(extra, dict) else None
        closed = extra is False
        names = self.compile(schema["propertyNames"]) if "propertyNames" in schema else None
        min_props = schema.get("minProperties", 0)

        allowed = frozenset(props)
        required_set = frozenset(required)

        def check(x: Any) -> bool:
            if type(x) is not dict or len(x) < min_props:
                return False
            keys = x.keys()
            if not required_set <= keys:
                return False
            if closed and not keys <= allowed:
                return False
            for key, value in x.items():
                sub = props.get(key)
                if sub is not None:
                    if not sub(value):
                        return False
                elif extra_check is not None and not extra_check(value):
                    return False
                if names is not None and not names(key):
                    return False
            return True

        return check

    def _array(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        item = self.compile(schema["items"]) if "items" in schema else None
        min_items, unique = schema.get("minItems", 0), schema.get("uniqueItems", False)

        def check(x: Any) -> bool:
            if type(x) is not list or len(x) < min_items:
                return False
            if item is not None and not all(item(value) for value in x):
                return False
            # Unique only if every item is a string: jsonschema's equality rules for others differ.
            return not unique or (all(type(v) is str for v in x) and len(set(x)) == len(x))

        return check

    def _string(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        regex = _ecma_regex(schema["pattern"]) if "pattern" in schema else None
        low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)

        def check(x: Any) -> bool:
            return type(x) is str and low <= len(x) <= high and (regex is None or regex.search(x) is not None)

        return check

    def _number(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        integer = schema["type"] == "integer"
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        above = schema.get("exclusiveMinimum", -math.inf)

        def check(x: Any) -> bool:
            if type(x) is float:
                if not math.isfinite(x) or (integer and not x.is_integer()):
                    return False
            elif type(x) is not int:
                return False
            return low <= x <= high and x > above

        return check

    def _boolean(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        return lambda x: type(x) is bool


GATE = _Gate(SCHEMA)


def structural_problems(doc: Any) -> list[Problem]:
    if doc is None:
        return [((), "the document is empty")]
    if GATE.root(doc):
        return []
    if not isinstance(doc, dict):
        return explain(DOC_VALIDATOR, doc, ())
    # Explain the document with its big collections emptied, then only the entries the gate rejects.
    stubbed = dict(doc)
    problems: list[Problem] = []
    for key, (kind, key_validator, item_validator) in COLLECTIONS.items():
        collection = doc.get(key)
        if kind == "object" and isinstance(collection, dict):
            stubbed[key] = {}
            names_gate, items_gate = GATE.root_parts[key]
            for name, item in collection.items():
                if not names_gate(name):
                    problems += explain(key_validator, name, (key,), key=True)
                if not items_gate(item):
                    problems += explain(item_validator, item, (key, name))
        elif kind == "array" and isinstance(collection, list):
            stubbed[key] = []
            _, items_gate = GATE.root_parts[key]
            for i, item in enumerate(collection):
                if not items_gate(item):
                    problems += explain(item_validator, item, (key, i))
    return explain(DOC_VALIDATOR, stubbed, ()) + problems


def explain(validator: Any, instance: Any, prefix: DocPath, *, key: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    for error in validator.iter_errors(instance):
        path = prefix + tuple(error.absolute_path)
        is_key = key or "propertyNames" in error.absolute_schema_path
        if is_key:
            path += (error.instance,)
        problems += schema_message(error, path, is_key)
    return problems
