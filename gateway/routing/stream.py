"""The fast path for a large, valid JSON table: parse, check and build one model at a time.

`json.loads` of a 100,000-model table makes ~900,000 dicts (~190 MiB) that live until the table is
built; the compiled objects then land in the holes the parser left, so that memory never goes back
to the system and every worker kept ~390 MiB. Here the C scanner of the json module reads one model's
value at a time; the model is gated, checked and built, and its document dropped before the next.

This path only ever answers "here is the table" or "not for me" (None). Anything unusual (not a
UTF-8 JSON object, `models` not the last section, a duplicate key, any problem at all) returns None
and the caller takes the classic path (`parse_document` + `compile_table`), which reports every
problem exactly as it always did. A table it builds is equal to the one the classic path builds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from json.decoder import WHITESPACE  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from gateway.routing.build import Builder
from gateway.routing.document import json_object
from gateway.routing.model import Model, Table
from gateway.routing.schema_gate import GATE
from gateway.routing.semantics import Semantics

_scan = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=json_object))  # type: ignore[attr-defined]


class _NotForMe(Exception):
    pass


def compile_json(data: bytes, *, digest: str, source: str, base_dir: Path) -> tuple[Table, dict[str, Any]] | None:
    """(table, the document's sections but `models`), or None: use the classic path."""
    try:
        text = data.decode("utf-8")
        return _compile(text, digest, source, base_dir)
    except (_NotForMe, ValueError, StopIteration, RecursionError, KeyError, TypeError, AttributeError):
        return None


def _compile(text: str, digest: str, source: str, base_dir: Path) -> tuple[Table, dict[str, Any]]:
    sections, models_at = _sections(text)
    names_ok, model_ok = GATE.root_parts["models"]
    first = next(_models(text, models_at), None)
    if first is None or not GATE.root({**sections, "models": dict([first])}):
        raise _NotForMe  # the schema explains the sections
    semantics = Semantics(sections, base_dir)  # no `models`: references to models are checked below
    semantics.run()
    builder = Builder(sections, base_dir)
    models: dict[str, Model] = {}
    teams: dict[str, str] = {}
    for model_id, doc in _models(text, models_at):
        if model_id in teams or not names_ok(model_id) or not model_ok(doc):
            raise _NotForMe
        semantics.check_model(("models", model_id), doc)
        if semantics.problems:
            raise _NotForMe
        teams[model_id] = doc["team"]
        model = builder.build_model(model_id, doc)
        models[model.id] = model
    for key in sections.get("api_keys", ()):
        if any(teams.get(model_id) != key["team"] for model_id in key.get("models", ())):
            raise _NotForMe  # an unknown model, or one of another team
    return builder.table(digest, source, models), {k: v for k, v in sections.items() if k != "api_keys"}


def _skip(text: str, at: int) -> int:
    return WHITESPACE.match(text, at).end()  # type: ignore[no-any-return]


def _expect(text: str, at: int, char: str) -> int:
    at = _skip(text, at)
    if text[at : at + 1] != char:
        raise _NotForMe
    return _skip(text, at + 1)


def _key(text: str, at: int) -> tuple[str, int]:
    if text[at : at + 1] != '"':
        raise _NotForMe
    key, at = _scan(text, at)
    return key, _expect(text, at, ":")


def _sections(text: str) -> tuple[dict[str, Any], int]:
    """Every top-level section before `models`, and where the models' mapping starts."""
    at = _expect(text, 0, "{")
    sections: dict[str, Any] = {}
    while True:
        key, at = _key(text, at)
        if key in sections:
            raise _NotForMe
        if key == "models":
            return sections, at
        sections[key], at = _scan(text, at)
        at = _expect(text, at, ",")


def _models(text: str, at: int) -> Iterator[tuple[str, Any]]:
    """(model id, its document) in order; then checks that `models` was the last section."""
    at = _expect(text, at, "{")
    if text[at : at + 1] == "}":
        raise _NotForMe
    while True:
        model_id, at = _key(text, at)
        doc, at = _scan(text, at)
        yield model_id, doc
        at = _skip(text, at)
        if text[at : at + 1] == "}":
            break
        at = _expect(text, at, ",")
    at = _expect(text, at + 1, "}")
    if at != len(text):
        raise _NotForMe
