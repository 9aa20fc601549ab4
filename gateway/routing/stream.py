"""The fast path for a large, valid JSON table: parse, check and build one model at a time.

`json.loads` of a 100,000-model table makes ~900,000 dicts (~190 MiB) that live until the table is
built; the compiled objects then land in the holes the parser left, so that memory never goes back
to the system and every worker kept ~390 MiB. Here the C scanner of the json module reads one model's
value at a time; the model is gated, checked and built, and its document dropped before the next.

This path only ever answers "here is the table" or "not for me" (None). Anything unusual (not a
UTF-8 JSON object, `models` not the last section, a duplicate key, any problem at all) returns None
and the caller takes the classic path (`parse_document` + `compile_table`), which reports every
problem exactly as it always did. A table it builds is equal to the one the classic path builds.

Large tables repeat themselves: thousands of models are written exactly alike but for their id. A
model's verdict (schema gate, semantic checks) depends on its document's text alone, since the other
sections are the same for every model, so each distinct text is checked and built once; a model whose
text was seen already is a copy of that first model under its own id (`Builder.clone_model`). For the
100,000-model benchmark table that took compiling from ~7.3 s to ~2 s. The texts are only an index:
at most `_TEMPLATES` of them are kept, and a table of all-different models pays one extra fast scan.
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
# Plain dicts built in C: ~2x faster than the hook above, but blind to duplicate keys. It only finds
# where a model's text ends; a text not seen before is read again with `_scan`.
_fast_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]
# The sections a Base does not keep: the models (written from the table) and the keys (in the table).
KEYED_SECTIONS = frozenset({"models", "api_keys", "admin_keys"})
_TEMPLATES = 4096  # distinct model texts remembered (their first model, already in the table)


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
    if first is None or not GATE.root({**sections, "models": {first[0]: _scan(first[1], 0)[0]}}):
        raise _NotForMe  # the schema explains the sections
    semantics = Semantics(sections, base_dir)  # no `models`: references to models are checked below
    semantics.run()
    builder = Builder(sections, base_dir)
    models: dict[str, Model] = {}
    teams: dict[str, str] = {}
    templates: dict[str, Model] = {}  # a model's text -> the model first built from it
    for model_id, model_text in _models(text, models_at):
        if model_id in teams or not names_ok(model_id):
            raise _NotForMe
        template = templates.get(model_text)
        if template is not None:
            model = builder.clone_model(template, model_id)
        else:
            model = _checked_model(model_id, model_text, model_ok, semantics, builder)
            if len(templates) < _TEMPLATES:
                templates[model_text] = model
        teams[model_id] = model.team
        models[model.id] = model
    for key in (*sections.get("api_keys", ()), *sections.get("admin_keys", ())):
        if any(teams.get(model_id) != key["team"] for model_id in key.get("models", ())):
            raise _NotForMe  # an unknown model, or one of another team
    return builder.table(digest, source, models), {k: v for k, v in sections.items() if k not in KEYED_SECTIONS}


def _checked_model(model_id: str, model_text: str, model_ok: Any, semantics: Semantics, builder: Builder) -> Model:
    doc, end = _scan(model_text, 0)  # duplicate keys raise here
    if end != len(model_text) or not model_ok(doc):
        raise _NotForMe
    semantics.check_model(("models", model_id), doc)
    if semantics.problems:
        raise _NotForMe
    return builder.build_model(model_id, doc)


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


def _models(text: str, at: int) -> Iterator[tuple[str, str]]:
    """(model id, the text of its document) in order; then checks that `models` was the last section."""
    at = _expect(text, at, "{")
    if text[at : at + 1] == "}":
        raise _NotForMe
    while True:
        model_id, at = _key(text, at)
        start = at
        _, at = _fast_scan(text, at)
        yield model_id, text[start:at]
        at = _skip(text, at)
        if text[at : at + 1] == "}":
            break
        at = _expect(text, at, ",")
    at = _expect(text, at + 1, "}")
    if at != len(text):
        raise _NotForMe
