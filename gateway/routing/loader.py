"""Read, validate and compile a routing table document (SPEC §3, §12) into a `Table`.

Three steps, each total:

1. `parse_document`: bytes -> plain data (YAML, or JSON which YAML reads too). Mapping keys are
   kept as the text written (keys here are names: `no:` must not become False, `0123:` must not become
   83), duplicate keys are errors, and nesting depth and alias expansion are bounded so a hostile file
   cannot crash or stall the gateway that reloads it.
2. Validation, before anything is built: the JSON Schema (`schema.json`, structure and unknown keys),
   then the semantic rules (references, residency, URLs, CIDRs, ...). Semantic checks skip values whose
   structure is already reported, so one run lists every problem, each as `dotted.path: message`.
3. Building: frozen dataclasses over read-only mappings, so a compiled `Table` cannot be changed.

`jsonschema` walks about 30,000 nodes a second here, far too slow for 100,000 models, so the schema is
also compiled into plain predicates (`_Gate`) that only answer "certainly valid?". jsonschema then
explains just the subtrees the predicates reject; the gate may reject more than jsonschema (it is
stricter about Python types) but never less, which `tests/test_table_loader.py` checks by property.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import hashlib
import ipaddress
import json
import math
import os
import re
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from gateway.routing.model import (
    ApiKey,
    Autoscaling,
    Canary,
    Deployment,
    Environment,
    GatewaySettings,
    HealthCheck,
    Model,
    Plane,
    PlaneTLS,
    Region,
    Shadow,
    Table,
    Team,
    Timeouts,
    Upstream,
)

try:  # libyaml's scanner/parser; composition stays in Python (see _YamlLoader)
    from yaml._yaml import CParser as _YamlParser

    def _init_parser(loader: Any, stream: bytes) -> None:
        _YamlParser.__init__(loader, stream)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _YamlParser(Reader, Scanner, _PyParser):  # type: ignore[no-redef]
        pass

    def _init_parser(loader: Any, stream: bytes) -> None:
        Reader.__init__(loader, stream)
        Scanner.__init__(loader)
        _PyParser.__init__(loader)


__all__ = ["SCHEMA_PATH", "TableInvalid", "compile_table", "load_table", "parse_document"]

SCHEMA_PATH = Path(__file__).with_name("schema.json")
ROOT = "(document)"  # how a problem with the whole document names its path
RESERVED_ENV = "development"
PRODUCTION = "production"

DocPath = tuple[Any, ...]  # a location in the document: str keys and int list indices


class TableInvalid(Exception):
    """The document is not a valid routing table; `problems` lists every reason, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- public API ------------------------------------------------------------------------------------


def load_table(path: str | os.PathLike[str]) -> Table:
    """Read, validate and compile the table at `path`; raise TableInvalid listing every problem."""
    data, digest = read_table_file(path)
    source = os.fspath(path)
    with _gc_paused():
        doc = parse_document(data, source)
        return compile_table(doc, digest=digest, source=source, base_dir=table_dir(source))


def read_table_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The file's bytes and their sha256 hex digest (the table's `digest`)."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise TableInvalid([f"{source}: cannot read the file: {exc.strerror or exc}"]) from None
    return data, hashlib.sha256(data).hexdigest()


def table_dir(source: str) -> Path:
    """Where relative file names in a table (plane `tls` files) are looked up: the table's directory."""
    return Path(os.path.abspath(source)).parent


def parse_document(data: bytes, source: str) -> Any:
    """Parse YAML or JSON bytes into plain data; a syntax error raises TableInvalid with its line."""
    if data.lstrip()[:1] in (b"{", b"["):
        # JSON is valid YAML, but the json module reads a 50 MB table 40x faster than PyYAML.
        try:
            return json.loads(data, object_pairs_hook=_json_object)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicate key, bad UTF-8
            json_error = exc
        # Not strict JSON (or a duplicate key): YAML decides, and reports with a line number.
        try:
            return _parse_yaml(data, source)
        except TableInvalid:
            if source.endswith(".json") and not isinstance(json_error, _DuplicateKey):
                raise TableInvalid([f"{source}: {json_error}"]) from None
            raise
    return _parse_yaml(data, source)


def compile_table(doc: Any, *, digest: str = "", source: str = "<memory>", base_dir: Path | None = None) -> Table:
    """Validate `doc` completely (structure, then semantics), then build the immutable Table.

    Relative `tls` file paths are resolved against `base_dir` (the table file's directory), or the
    current directory when it is None. Raises TableInvalid with every problem found.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    with _gc_paused():
        try:
            problems = _structural_problems(doc)
            problems += _Semantics(doc, base).run()
        except RecursionError:
            problems = [((), "the document is nested too deeply or refers to itself")]
        if problems:
            raise TableInvalid(_render(problems))
        return _Builder(doc, base).table(digest, source)


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a table is compiled (tables may compile on several threads).

    Compiling 100,000 models allocates millions of objects and no garbage cycles; every allocation
    burst would trigger a full collection over the growing heap, which made compiling 2.5x slower.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


# -- parsing ---------------------------------------------------------------------------------------

MAX_DEPTH = 64  # a valid table nests 8 levels; libyaml's composer segfaults near 30,000
MIN_ALIAS_BUDGET = 1_000_000  # expanded nodes always allowed (see _YamlLoader.finish)


class _DuplicateKey(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey("duplicate key")
    return obj


class _YamlLoader(Composer, _YamlParser, SafeConstructor, Resolver):
    """SafeLoader with libyaml's parser, Python composition (bounded), raw-text keys, no duplicates.

    Composition is done by PyYAML's Python Composer on purpose: libyaml's recursive composer
    overflows the C stack on deeply nested input and kills the process, which a gateway that reloads
    its table must never do. The Python one is bounded by MAX_DEPTH and costs ~10% more.
    """

    def __init__(self, stream: bytes) -> None:
        _init_parser(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._aliases = 0

    # Nodes and events are typed Any: PyYAML's stubs do not describe libyaml's Mark and Event types.
    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()
        mark: Any = event.start_mark
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels", mark)
        anchor = event.anchor
        if anchor is not None:
            if isinstance(event, yaml.AliasEvent):
                self._aliases += 1
                if anchor in self._open:
                    message = f"alias *{anchor} refers to a node that contains it"
                    raise ComposerError(None, None, message, mark)
            else:
                self._open.add(anchor)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)

    def finish(self, root: Any) -> None:
        """Refuse alias 'bombs': a few lines that expand to billions of nodes."""
        if root is None or not self._aliases:
            return
        expanded = _expanded_size(root)
        budget = max(MIN_ALIAS_BUDGET, 4 * len(expanded))
        if expanded[id(root)] > budget:
            message = f"aliases expand the document to {expanded[id(root)]} nodes (limit {budget})"
            raise ComposerError(None, None, message, root.start_mark)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # e.g. the timestamp 2024-02-30
            raise ConstructorError(None, None, f"invalid value: {exc}", node.start_mark) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Hashable, Any]:
        if not isinstance(node, MappingNode):
            raise ConstructorError(None, None, f"expected a mapping, found {node.id}", node.start_mark)
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by explicit keys (YAML merge semantics)
            if not isinstance(key_node, ScalarNode):
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    "keys must be plain names",
                    key_node.start_mark,
                )
            if key_node.value in seen:
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        self.flatten_mapping(node)
        mapping: dict[Hashable, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise ConstructorError(None, None, "keys must be plain names", key_node.start_mark)
            # Keys are names: keep the text as written instead of resolving `no`, `null` or `0123`.
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def _expanded_size(root: Any) -> dict[int, int]:
    """id(node) -> how many nodes it stands for once aliases are expanded (iterative: aliases chain)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, SequenceNode) else []
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes


def _parse_yaml(data: bytes, source: str) -> Any:
    loader = _YamlLoader(data)
    try:
        root = loader.get_single_node()
        loader.finish(root)
        return None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise TableInvalid([f"{source}: {_yaml_message(exc)}"]) from None
    except yaml.YAMLError as exc:  # ReaderError (bad encoding) and friends carry no mark
        raise TableInvalid([f"{source}: {exc}"]) from None
    except RecursionError:
        raise TableInvalid([f"{source}: the document is nested too deeply"]) from None
    finally:
        loader.dispose()


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(part for part in (exc.context, exc.problem) if part)
    return f"{where}{what or 'invalid YAML'}"


# -- structural validation: the JSON Schema -------------------------------------------------------


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
_DOC_VALIDATOR = _Validator(SCHEMA)


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


_COLLECTIONS = _collections()


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
        # (key predicate, item predicate) of each top-level collection, for _structural_problems
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

        def check(x: Any) -> bool:
            if type(x) is not dict or len(x) < min_props:
                return False
            for key in required:
                if key not in x:
                    return False
            for key, value in x.items():
                sub = props.get(key)
                if sub is not None:
                    if not sub(value):
                        return False
                elif closed or (extra_check is not None and not extra_check(value)):
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


_GATE = _Gate(SCHEMA)

Problem = tuple[DocPath, str]


def _structural_problems(doc: Any) -> list[Problem]:
    if doc is None:
        return [((), "the document is empty")]
    if _GATE.root(doc):
        return []
    if not isinstance(doc, dict):
        return _explain(_DOC_VALIDATOR, doc, ())
    # Explain the document with its big collections emptied, then only the entries the gate rejects.
    stubbed = dict(doc)
    problems: list[Problem] = []
    for key, (kind, key_validator, item_validator) in _COLLECTIONS.items():
        collection = doc.get(key)
        if kind == "object" and isinstance(collection, dict):
            stubbed[key] = {}
            names_gate, items_gate = _GATE.root_parts[key]
            for name, item in collection.items():
                if not names_gate(name):
                    problems += _explain(key_validator, name, (key,), key=True)
                if not items_gate(item):
                    problems += _explain(item_validator, item, (key, name))
        elif kind == "array" and isinstance(collection, list):
            stubbed[key] = []
            _, items_gate = _GATE.root_parts[key]
            for i, item in enumerate(collection):
                if not items_gate(item):
                    problems += _explain(item_validator, item, (key, i))
    return _explain(_DOC_VALIDATOR, stubbed, ()) + problems


def _explain(validator: Any, instance: Any, prefix: DocPath, *, key: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    for error in validator.iter_errors(instance):
        path = prefix + tuple(error.absolute_path)
        is_key = key or "propertyNames" in error.absolute_schema_path
        if is_key:
            path += (error.instance,)
        problems += _schema_message(error, path, is_key)
    return problems


_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "null": "null",
}


def _schema_message(error: ValidationError, path: DocPath, is_key: bool) -> list[Problem]:
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
        return f"{_q(x)} is not {description}"
    messages: dict[str, Callable[[], str]] = {
        "const": lambda: f"must be {value!r}, got {_describe(x)}",
        "enum": lambda: f"{_q(x)} is not one of: {', '.join(map(str, value))}",
        "minimum": lambda: f"must be at least {value}, got {_clip(repr(x))}",
        "maximum": lambda: f"must be at most {value}, got {_clip(repr(x))}",
        "exclusiveMinimum": lambda: f"must be greater than {value}, got {_clip(repr(x))}",
        "minItems": lambda: "must not be empty" if value == 1 else f"needs at least {value} items",
        "minProperties": lambda: "must not be empty" if value == 1 else f"needs at least {value} keys",
        "minLength": lambda: "must not be empty" if value == 1 else f"must be at least {value} characters",
        "maxLength": lambda: f"is too long (at most {value} characters)",
        "uniqueItems": lambda: f"lists {', '.join(_q(d) for d in _duplicates(x)) or 'an item'} more than once",
        "pattern": lambda: f"{_q(x)} does not have the expected form",
    }
    make = messages.get(str(kind))
    return make() if make is not None else error.message


def _unknown_key(key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {_q(close[0])}?" if close else f"allowed: {', '.join(allowed)}"
    return f"unknown key {_q(key)} ({hint})"


def _missing_key(key: str, path: DocPath) -> str:
    if key == PRODUCTION and path[-1:] == ("environments",):
        return "missing: every model needs a 'production' environment"
    return f"required key {_q(key)} is missing"


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
        return f"the string {_q(x)}"
    if isinstance(x, dict):
        return "a mapping"
    if isinstance(x, list):
        return "a list"
    return f"a value of type {type(x).__name__} ({_clip(repr(x))})"


def _q(x: Any) -> str:
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


def _sort_key(problem: Problem) -> tuple[Any, ...]:
    path, message = problem
    segs = tuple(
        (1, "", seg)
        if isinstance(seg, int) and not isinstance(seg, bool)
        else (0, seg if isinstance(seg, str) else repr(seg), 0)
        for seg in path
    )
    return segs, message


def _render(problems: Iterable[Problem]) -> list[str]:
    unique = {(tuple(path), message) for path, message in problems}
    return [f"{_format_path(path)}: {message}" for path, message in sorted(unique, key=_sort_key)]


# -- value syntax: names, hosts, URLs, networks ---------------------------------------------------

_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)\Z", re.S)
_IPV4_LIKE = re.compile(r"[0-9.]+\Z")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}\Z")


class _SyntaxProblem(ValueError):
    pass


def _dns_name(host: str) -> str:
    """Validate a DNS host name (RFC 1123 labels); return it lowercased."""
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise _SyntaxProblem(f"{_q(host)} is not a valid host name")
    if labels[-1].isdigit():  # RFC 3696 §2: a top-level label is never all-numeric
        raise _SyntaxProblem(f"{_q(host)} is neither a valid IPv4 address nor a host name")
    return host.lower()


def _host(text: str) -> str:
    """A DNS name, an IPv4 address or a bracketed IPv6 address -> normalized host (IPv6 unbracketed)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise _SyntaxProblem(f"{_q(text)} is not a valid bracketed IPv6 address")
        return _ipv6(text[1:-1])
    if ":" in text:
        raise _SyntaxProblem(f"IPv6 address {_q(text)} must be written in brackets: [{text}]")
    if _IPV4_LIKE.match(text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise _SyntaxProblem(f"{_q(text)} is not a valid IPv4 address") from None
    return _dns_name(text)


def _ipv6(text: str) -> str:
    if "%" in text:
        raise _SyntaxProblem(f"IPv6 zone ids are not supported ({_q(text)})")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise _SyntaxProblem(f"{_q(text)} is not a valid IPv6 address") from None


def _port(text: str) -> int:
    if not text:
        raise _SyntaxProblem("the port is empty")
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise _SyntaxProblem(f"{_q(text)} is not a valid port (1-65535)")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host text, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _SyntaxProblem(f"{_q(text)} has an unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _SyntaxProblem(f"unexpected {_q(rest)} after the IPv6 address")
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise _SyntaxProblem(f"{_q(text)}: an IPv6 address must be written in brackets, like [::1]:8080")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def parse_upstream(url: str) -> Upstream:
    """`http(s)://host[:port][/]` -> Upstream; anything else (path, query, user info) is refused."""
    match = _URL.match(url)
    if match is None:
        raise _SyntaxProblem(f"{_q(url)} is not a URL like http://host:port or https://host:port")
    scheme = match["scheme"].lower()
    if scheme not in ("http", "https"):
        raise _SyntaxProblem(f"unsupported scheme {_q(match['scheme'])} (use http:// or https://)")
    authority = match["authority"]
    if "@" in authority:
        raise _SyntaxProblem("must not contain user information (user@); planes authenticate with tls")
    if match["path"] not in ("", "/"):
        raise _SyntaxProblem(f"must not have a path ({_q(match['path'])}); give only scheme, host and port")
    if match["rest"]:
        part = "query" if match["rest"].startswith("?") else "fragment"
        raise _SyntaxProblem(f"must not have a {part} ({_q(match['rest'])})")
    host, port = _split_host_port(authority)
    if not host:
        raise _SyntaxProblem(f"{_q(url)} has no host")
    default = 443 if scheme == "https" else 80
    return Upstream(scheme, _host(host), default if port is None else _port(port))  # type: ignore[arg-type]


def parse_host_port(text: str) -> str:
    """`host:port` (gRPC target) -> normalized `host:port` (IPv6 as `[addr]:port`)."""
    if "://" in text:
        raise _SyntaxProblem(f"{_q(text)} must be host:port, without a scheme")
    host, port = _split_host_port(text)
    if port is None:
        raise _SyntaxProblem(f"{_q(text)} needs a port (host:port)")
    if not host:
        raise _SyntaxProblem(f"{_q(text)} has no host")
    normalized = _host(host)
    return f"[{normalized}]:{_port(port)}" if ":" in normalized else f"{normalized}:{_port(port)}"


def parse_nameserver(text: str) -> str:
    """`IP`, `IP:port`, `[IPv6]` or `[IPv6]:port` -> normalized in the same form."""
    if text.count(":") > 1 and not text.startswith("["):
        return _ipv6(text)  # a bare IPv6 address, no port
    host, port = _split_host_port(text)
    if host.startswith("["):
        address = _ipv6(host[1:-1])
        return f"[{address}]:{_port(port)}" if port is not None else address
    try:
        address = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise _SyntaxProblem(f"{_q(text)} is not an IP address with an optional port (IP[:port])") from None
    return f"{address}:{_port(port)}" if port is not None else address


_SRV_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def parse_srv_name(text: str) -> str:
    """An SRV owner name (`_service._proto.name`, RFC 2782: labels may start with '_') -> lowercased,
    without a trailing dot."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_SRV_LABEL.match(label) for label in labels):
        raise _SyntaxProblem(f"{_q(text)} is not a valid SRV name (like _http._tcp.v1.models.internal)")
    if _IPV4_LIKE.match(name):
        raise _SyntaxProblem(f"{_q(text)} is an address, not an SRV name; list addresses under endpoints")
    return name.lower()


def parse_network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _SyntaxProblem(f"{_q(text)} is not a network in CIDR form (like 10.10.0.0/16)") from None


# -- semantic validation ---------------------------------------------------------------------------


def _d(x: Any) -> dict[Any, Any]:
    return x if isinstance(x, dict) else {}


def _map_or_none(x: Any) -> dict[Any, Any] | None:
    return x if isinstance(x, dict) else None


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _int(x: Any) -> int | None:
    if type(x) is int or (type(x) is float and x.is_integer()):
        return int(x)
    return None


class _Semantics:
    """Cross-field rules. Reads the raw document defensively: a value of the wrong type was already
    reported by the schema and is skipped here, so every other rule still runs."""

    def __init__(self, doc: Any, base_dir: Path) -> None:
        self.doc = _d(doc)
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # A section that is missing or not a mapping is reported by the schema; references into it
        # are then not checked (None), rather than each reported as unknown.
        self.regions = _map_or_none(self.doc.get("regions"))
        self.planes = _map_or_none(self.doc.get("planes"))
        self.teams = _map_or_none(self.doc.get("teams"))
        self.models = _map_or_none(self.doc.get("models"))
        regions = self.regions or {}
        self.plane_region = {  # only regions that exist: an unknown one is reported under planes
            name: region
            for name, p in (self.planes or {}).items()
            if isinstance(region := _d(p).get("region"), str) and region in regions
        }
        self.regional = {name: _d(_d(t).get("regional_environments")) for name, t in (self.teams or {}).items()}

    def run(self) -> list[Problem]:
        self.check_domains()
        self.check_gateway()
        self.check_regions()
        self.check_planes()
        self.check_teams()
        self.check_api_keys()
        for model_id, model in (self.models or {}).items():
            if isinstance(model, dict):
                self.check_model(("models", model_id), model)
        return self.problems

    def add(self, path: DocPath, message: str) -> None:
        self.problems.append((path, message))

    def ref(self, path: DocPath, value: Any, known: dict[Any, Any] | None, what: str) -> bool:
        """Report an unknown reference; True when `value` names something that exists."""
        if not isinstance(value, str) or known is None:
            return False
        if value not in known:
            self.add(path, f"unknown {what} {_q(value)}")
            return False
        return True

    def syntax(self, path: DocPath, value: Any, parse: Callable[[str], Any]) -> Any:
        if not isinstance(value, str):
            return None
        try:
            return parse(value)
        except _SyntaxProblem as exc:
            self.add(path, str(exc))
            return None

    # top level

    def check_domains(self) -> None:
        first: dict[str, int] = {}
        for i, domain in enumerate(_list(self.doc.get("domains"))):
            path = ("domains", i)
            if not _GATE.defs["domain"](domain):
                continue  # the schema explains it
            name = self.syntax(path, domain, _dns_name)
            if name is None:
                continue
            name = name.removesuffix(".")
            if name in first:
                self.add(path, f"duplicate domain {_q(name)} (also domains[{first[name]}])")
            first.setdefault(name, i)

    def check_gateway(self) -> None:
        gateway = _d(self.doc.get("gateway"))
        for i, region in enumerate(_list(gateway.get("regions"))):
            self.ref(("gateway", "regions", i), region, self.regions, "region")
        servers = _list(_d(gateway.get("dns")).get("nameservers"))
        for i, server in enumerate(servers):
            self.syntax(("gateway", "dns", "nameservers", i), server, parse_nameserver)

    def check_regions(self) -> None:
        for name, region in (self.regions or {}).items():
            for i, network in enumerate(_list(_d(region).get("networks"))):
                self.syntax(("regions", name, "networks", i), network, parse_network)

    def check_planes(self) -> None:
        for name, plane in (self.planes or {}).items():
            plane = _d(plane)
            path = ("planes", name)
            self.ref(path + ("region",), plane.get("region"), self.regions, "region")
            upstream = self.syntax(path + ("url",), plane.get("url"), parse_upstream)
            self.syntax(path + ("grpc",), plane.get("grpc"), parse_host_port)
            tls = plane.get("tls")
            if isinstance(tls, dict):
                self.check_tls(path + ("tls",), tls, upstream)

    def check_tls(self, path: DocPath, tls: dict[Any, Any], upstream: Upstream | None) -> None:
        if upstream is not None and upstream.scheme != "https":
            self.add(path, "tls is only allowed for https:// planes")
        if ("cert" in tls) != ("key" in tls):
            self.add(path, "cert and key go together: a client certificate needs its private key")
        for field in ("ca", "cert", "key"):
            value = tls.get(field)
            if isinstance(value, str) and value:
                problem = _file_problem(_resolve_file(self.base_dir, value))
                if problem:
                    self.add(path + (field,), problem)

    def check_teams(self) -> None:
        for name, mapping in self.regional.items():
            for env, region in mapping.items():
                path = ("teams", name, "regional_environments", env)
                if env == RESERVED_ENV:
                    self.add(path, "'development' is reserved and is never a regional environment")
                self.ref(path, region, self.regions, "region")

    def check_api_keys(self) -> None:
        names: dict[str, int] = {}
        digests: dict[str, int] = {}
        for i, key in enumerate(_list(self.doc.get("api_keys"))):
            if not isinstance(key, dict):
                continue
            path = ("api_keys", i)
            name = _str(key.get("name"))
            if name is not None:
                if name in names:
                    self.add(path + ("name",), f"duplicate api key name {_q(name)} (also api_keys[{names[name]}])")
                names.setdefault(name, i)
            digest = _str(key.get("sha256"))
            if digest is not None and _HEX64.match(digest):
                digest = digest.lower()
                if digest in digests:
                    self.add(
                        path + ("sha256",),
                        f"the same key digest is already listed at api_keys[{digests[digest]}]",
                    )
                digests.setdefault(digest, i)
            team_known = self.ref(path + ("team",), key.get("team"), self.teams, "team")
            for j, model_id in enumerate(_list(key.get("models"))):
                if self.ref(path + ("models", j), model_id, self.models, "model") and team_known:
                    owner = _d(_d(self.models).get(model_id)).get("team")
                    if isinstance(owner, str) and owner != key["team"]:
                        message = f"model {_q(model_id)} belongs to team {_q(owner)}"
                        self.add(path + ("models", j), f"{message}, not to the key's team {_q(key['team'])}")

    # models

    def check_model(self, path: DocPath, model: dict[Any, Any]) -> None:
        team = model.get("team")
        self.ref(path + ("team",), team, self.teams, "team")
        deployments = _d(model.get("deployments"))
        development: Any = None
        for dep_id, dep in deployments.items():
            if not isinstance(dep, dict):
                continue
            dep_path = path + ("deployments", dep_id)
            self.ref(dep_path + ("plane",), dep.get("plane"), self.planes, "plane")
            self.check_endpoints(dep_path + ("endpoints",), _list(dep.get("endpoints")))
            self.check_srv(dep_path, dep)
            if dep.get("development") is True:
                if development is not None:
                    self.add(
                        dep_path + ("development",),
                        f"a model has at most one development deployment, and {_q(development)} already is",
                    )
                else:
                    development = dep_id
        pinned = self.regional.get(team, {}) if isinstance(team, str) else {}
        environments = _d(model.get("environments"))
        for env, environment in environments.items():
            if isinstance(environment, dict):
                self.check_environment(path + ("environments", env), env, environment, deployments, pinned)
        for i, env in enumerate(_list(model.get("deleted_environments"))):
            self.check_deleted(path + ("deleted_environments", i), env, environments)

    def check_endpoints(self, path: DocPath, endpoints: list[Any]) -> None:
        first: dict[Upstream, int] = {}
        for i, url in enumerate(endpoints):
            upstream = self.syntax(path + (i,), url, parse_upstream)
            if upstream is None:
                continue
            if upstream in first:
                self.add(path + (i,), f"the same endpoint is already listed at endpoints[{first[upstream]}]")
            first.setdefault(upstream, i)

    def check_srv(self, path: DocPath, dep: dict[Any, Any]) -> None:
        if "endpoints_srv" not in dep:
            return
        self.syntax(path + ("endpoints_srv",), dep["endpoints_srv"], parse_srv_name)
        if "endpoints" in dep:
            self.add(path + ("endpoints_srv",), "endpoints and endpoints_srv exclude each other: list the "
                     "replicas or discover them, not both")  # fmt: skip
        if "replicas" in dep:
            self.add(path + ("replicas",), "with endpoints_srv the replica count is the number of SRV targets "
                     "discovered; remove replicas")  # fmt: skip

    def check_environment(
        self,
        path: DocPath,
        env: Any,
        environment: dict[Any, Any],
        deployments: dict[Any, Any],
        pinned: dict[Any, Any],
    ) -> None:
        if env == RESERVED_ENV:
            self.add(path, "'development' is reserved (call /development/... for the development deployment)")
        region = pinned.get(env)
        if not isinstance(region, str) or region not in (self.regions or {}):
            region = None  # not pinned, or pinned to an unknown region (reported under teams)
        current = environment.get("deployment")
        self.check_target(path + ("deployment",), env, current, deployments, region)
        for role in ("canary", "shadow"):
            extra = environment.get(role)
            if not isinstance(extra, dict):
                continue
            if "deployment" not in environment:
                self.add(path + (role,), f"a {role} needs the environment to have a deployment")
            self.check_target(path + (role, "deployment"), env, extra.get("deployment"), deployments, region)
        scaling = _d(environment.get("autoscaling"))
        low, high = _int(scaling.get("min_replica")), _int(scaling.get("max_replica"))
        if low is not None and low > (1 if high is None else high):
            limit = "max_replica" if high is not None else "the default max_replica"
            self.add(path + ("autoscaling",), f"min_replica ({low}) is greater than {limit} ({high or 1})")

    def check_target(
        self, path: DocPath, env: Any, dep_id: Any, deployments: dict[Any, Any], region: str | None
    ) -> None:
        """A deployment named by an environment: it exists, and honours the environment's region."""
        if not self.ref(path, dep_id, deployments, "deployment") or region is None:
            return
        plane = _d(deployments[dep_id]).get("plane")
        plane_region = self.plane_region.get(plane) if isinstance(plane, str) else None
        if plane_region is not None and plane_region != region:
            self.add(
                path,
                f"deployment {_q(dep_id)} runs on plane {_q(plane)} in region {_q(plane_region)}, "
                f"but environment {_q(env)} is pinned to region {_q(region)}",
            )

    def check_deleted(self, path: DocPath, env: Any, environments: dict[Any, Any]) -> None:
        if env == PRODUCTION:
            self.add(path, "'production' cannot be deleted")
        elif env == RESERVED_ENV:
            self.add(path, "'development' is reserved and is not an environment")
        elif isinstance(env, str) and env in environments:
            self.add(path, f"environment {_q(env)} is also defined in environments; it is either live or deleted")


def _resolve_file(base_dir: Path, name: str) -> Path:
    return Path(os.path.normpath(base_dir / name))


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return f"file not found: {path}"
        if not path.is_file():
            return f"not a regular file: {path}"
        if not os.access(path, os.R_OK):
            return f"file not readable: {path}"
    except (OSError, ValueError) as exc:
        return f"cannot use {_q(str(path))}: {exc}"
    return None


# -- building --------------------------------------------------------------------------------------

_DEFAULT_TIMEOUTS = Timeouts()
_DEFAULT_AUTOSCALING = Autoscaling()
_TIMEOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Timeouts))


def _frozen(mapping: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(mapping)


def _health_check(*levels: Any) -> HealthCheck | None:
    """`health_check` of a plane, then of a deployment: field by field, the more specific wins.

    None when no level sets it, or when the most specific `enabled` is false.
    """
    given = [_d(level) for level in levels if level is not None]
    if not given:
        return None
    merged: dict[str, Any] = {}
    for level in given:
        merged.update(level)
    if not merged.pop("enabled", True):
        return None
    kinds = {"interval_seconds": float, "timeout_seconds": float, "unhealthy_threshold": int,
             "healthy_threshold": int, "path": str}  # fmt: skip
    return HealthCheck(**{k: kinds[k](v) for k, v in merged.items()})


def _timeouts(base: Timeouts, overrides: Any) -> Timeouts:
    """Field by field, the more specific level wins (SPEC §12)."""
    given = {k: float(v) for k, v in _d(overrides).items() if k in _TIMEOUT_FIELDS}
    return dataclasses.replace(base, **given) if given else base


class _Builder:
    """Turns a validated document into a Table; the validation above guarantees every lookup here."""

    def __init__(self, doc: dict[str, Any], base_dir: Path) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.gateway = self.build_gateway(_d(doc.get("gateway")))
        self.planes = {name: self.build_plane(name, p) for name, p in doc["planes"].items()}
        # Effective timeouts per plane (plane > gateway > defaults), shared by its deployments.
        self.plane_timeouts = {
            name: _timeouts(self.gateway.timeouts, p.get("timeouts")) for name, p in doc["planes"].items()
        }
        self.teams = {name: self.build_team(name, t) for name, t in doc["teams"].items()}
        self._dep_timeouts: dict[tuple[str, tuple[tuple[str, Any], ...]], Timeouts] = {}
        self._upstreams: dict[str, Upstream] = {}

    def table(self, digest: str, source: str) -> Table:
        doc = self.doc
        models = {model_id: self.build_model(model_id, m) for model_id, m in doc["models"].items()}
        keys = [self.build_key(k) for k in doc.get("api_keys", [])]
        return Table(
            version=1,
            digest=digest,
            domains=frozenset(d.lower().removesuffix(".") for d in doc["domains"]),
            gateway=self.gateway,
            regions=_frozen(
                {
                    name: Region(name, tuple(parse_network(n) for n in r.get("networks", [])))
                    for name, r in doc["regions"].items()
                }
            ),
            planes=_frozen(self.planes),
            teams=_frozen(self.teams),
            models=_frozen(models),
            api_keys=_frozen({key.sha256: key for key in keys}),
            source=source,
        )

    def build_gateway(self, g: dict[str, Any]) -> GatewaySettings:
        regions = g.get("regions")
        return GatewaySettings(
            regions=frozenset(regions) if regions is not None else None,
            hold_timeout_seconds=float(g.get("hold_timeout_seconds", 300.0)),
            max_held_calls_per_deployment=int(g.get("max_held_calls_per_deployment", 1000)),
            timeouts=_timeouts(_DEFAULT_TIMEOUTS, g.get("timeouts")),
            dns_nameservers=tuple(parse_nameserver(s) for s in _d(g.get("dns")).get("nameservers", [])),
        )

    def build_plane(self, name: str, p: dict[str, Any]) -> Plane:
        tls = p.get("tls")
        return Plane(
            name=name,
            region=p["region"],
            url=parse_upstream(p["url"]),
            grpc=parse_host_port(p["grpc"]) if "grpc" in p else None,
            # None when the plane sets no timeouts of its own: it inherits table.gateway.timeouts.
            # Otherwise the full merge (plane > gateway > defaults), so readers never merge again.
            timeouts=_timeouts(self.gateway.timeouts, p["timeouts"]) if p.get("timeouts") else None,
            tls=PlaneTLS(**{k: str(_resolve_file(self.base_dir, v)) for k, v in tls.items()}) if tls else None,
            health_check=_health_check(p.get("health_check")),
        )

    def build_team(self, name: str, t: dict[str, Any]) -> Team:
        return Team(name, _frozen(dict(t.get("regional_environments", {}))))

    def build_model(self, model_id: str, m: dict[str, Any]) -> Model:
        deployments = {dep_id: self.build_deployment(model_id, dep_id, d) for dep_id, d in m["deployments"].items()}
        pinned = self.teams[m["team"]].regional_environments
        environments = {
            env: self.build_environment(env, e, deployments, pinned.get(env)) for env, e in m["environments"].items()
        }
        development = next((d for d in deployments.values() if d.development), None)
        return Model(
            id=model_id,
            team=m["team"],
            kind=m.get("kind", "model"),
            deployments=_frozen(deployments),
            environments=_frozen(environments),
            development=development,
            deleted_environments=frozenset(m.get("deleted_environments", ())),
        )

    def build_deployment(self, model_id: str, dep_id: str, d: dict[str, Any]) -> Deployment:
        plane = d["plane"]
        replicas = d.get("replicas")
        return Deployment(
            id=dep_id,
            model_id=model_id,
            plane=self.planes[plane],
            status=d.get("status", "active"),
            development=d.get("development", False),
            endpoints=tuple(self.upstream(u) for u in d.get("endpoints", ())),
            replicas=int(replicas) if replicas is not None else None,
            timeouts=self.deployment_timeouts(plane, d.get("timeouts")),
            endpoints_srv=parse_srv_name(d["endpoints_srv"]) if "endpoints_srv" in d else None,
            health_check=_health_check(self.doc["planes"][plane].get("health_check"), d.get("health_check")),
        )

    def deployment_timeouts(self, plane: str, overrides: Any) -> Timeouts:
        if not overrides:
            return self.plane_timeouts[plane]
        key = (plane, tuple(sorted(overrides.items())))
        found = self._dep_timeouts.get(key)
        if found is None:
            found = self._dep_timeouts[key] = _timeouts(self.plane_timeouts[plane], overrides)
        return found

    def upstream(self, url: str) -> Upstream:
        found = self._upstreams.get(url)
        if found is None:
            found = self._upstreams[url] = parse_upstream(url)
        return found

    def build_environment(
        self, name: str, e: dict[str, Any], deployments: dict[str, Deployment], region: str | None
    ) -> Environment:
        canary, shadow, scaling = e.get("canary"), e.get("shadow"), e.get("autoscaling")
        return Environment(
            name=name,
            deployment=deployments[e["deployment"]] if "deployment" in e else None,
            region=region,
            canary=Canary(deployments[canary["deployment"]], float(canary["percent"])) if canary else None,
            shadow=Shadow(
                deployments[shadow["deployment"]],
                float(shadow["percent"]),
                int(shadow.get("max_body_bytes", 1024 * 1024)),
            )
            if shadow
            else None,
            autoscaling=self.build_autoscaling(scaling) if scaling else _DEFAULT_AUTOSCALING,
            backpressure=_d(e.get("backpressure")).get("policy", "QUEUE_ON_FULL"),
        )

    def build_autoscaling(self, a: dict[str, Any]) -> Autoscaling:
        target = a.get("concurrency_target")
        return Autoscaling(
            min_replica=int(a.get("min_replica", 0)),
            max_replica=int(a.get("max_replica", 1)),
            concurrency_target=int(target) if target is not None else None,
        )

    def build_key(self, k: dict[str, Any]) -> ApiKey:
        envs, models = k.get("environments"), k.get("models")
        return ApiKey(
            name=k["name"],
            team=k["team"],
            sha256=bytes.fromhex(k["sha256"]),
            environments=frozenset(envs) if envs is not None else None,
            models=frozenset(models) if models is not None else None,
        )
