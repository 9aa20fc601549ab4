"""Document hardening: bytes -> plain data (YAML, or JSON which YAML reads too).

Mapping keys are kept as the text written (keys here are names: `no:` must not become False, `0123:`
must not become 83), duplicate keys are errors, and nesting depth and alias expansion are bounded so a
hostile file cannot crash or stall the gateway that reloads it.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from gateway.routing.problems import TableInvalid

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


def parse_document(data: bytes, source: str) -> Any:
    """Parse YAML or JSON bytes into plain data; a syntax error raises TableInvalid with its line."""
    if data.lstrip()[:1] in (b"{", b"["):
        # JSON is valid YAML, but the json module reads a 50 MB table 40x faster than PyYAML.
        try:
            return json.loads(data, object_pairs_hook=json_object)
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


MAX_DEPTH = 64  # a valid table nests 8 levels; libyaml's composer segfaults near 30,000
MIN_ALIAS_BUDGET = 1_000_000  # expanded nodes always allowed (see _YamlLoader.finish)


class _DuplicateKey(ValueError):
    pass


def json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
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
