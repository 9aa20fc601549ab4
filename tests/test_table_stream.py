"""The one-model-at-a-time JSON path (`routing/stream.py`) and model documents written back from a
compiled table (`routing/source.py`): both must give exactly what the classic loader gives."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from gateway.routing.loader import TableInvalid, compile_source, compile_table, load_table
from gateway.routing.source import model_document
from gateway.routing.stream import compile_json

REPO = Path(__file__).resolve().parents[1]
TABLES = [REPO / "routing_config" / "example.yaml", REPO / "routing_config" / "replicas.yaml"]


def _doc(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_model_documents_compile_to_the_same_models(path: Path) -> None:
    doc = _doc(path)
    table = compile_table(doc, base_dir=path.parent)
    written = dict(doc, models={m: model_document(model, table) for m, model in table.models.items()})
    assert compile_table(written, base_dir=path.parent).models == table.models


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_the_json_path_builds_the_classic_table(path: Path, tmp_path: Path) -> None:
    doc = _doc(path)
    for name, plane in doc["planes"].items():  # tls files are looked up next to the table
        plane.pop("tls", None)
        if plane["url"].startswith("https"):
            doc["planes"][name]["url"] = "http" + plane["url"][5:]
    data = json.dumps(doc, indent=1).encode()
    fast = compile_json(data, digest="d", source="t.json", base_dir=tmp_path)
    assert fast is not None
    classic = compile_table(doc, digest="d", source="t.json", base_dir=tmp_path)
    assert fast[0] == classic
    assert "models" not in fast[1] and "api_keys" not in fast[1]


def _small() -> dict:
    return {
        "version": 1,
        "domains": ["api.example.com"],
        "regions": {"us": {}},
        "planes": {"p": {"region": "us", "url": "http://127.0.0.1:9001"}},
        "teams": {"t": {}, "u": {}},
        "api_keys": [{"name": "k", "team": "t", "sha256": "a" * 64, "models": ["m"]}],
        "models": {
            "m": {
                "team": "t",
                "deployments": {"v1": {"plane": "p"}},
                "environments": {"production": {"deployment": "v1"}},
            }
        },
    }


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["models"]["m"]["environments"]["production"].update(deployment="v9"),
        lambda d: d["models"].update(n={"team": "t"}),
        lambda d: d["models"].update(n=dict(copy.deepcopy(d["models"]["m"]), team="nope")),
        lambda d: d["api_keys"][0].update(team="u"),
        lambda d: d["api_keys"][0].update(models=["zz"]),
        lambda d: d.update(domains=["bad domain"]),
    ],
)
def test_any_problem_takes_the_classic_path(change, tmp_path: Path) -> None:
    doc = _small()
    change(doc)
    data = json.dumps(doc).encode()
    assert compile_json(data, digest="", source="t.json", base_dir=tmp_path) is None
    path = tmp_path / "t.json"
    path.write_bytes(data)
    with pytest.raises(TableInvalid) as error:
        load_table(path)
    with pytest.raises(TableInvalid) as classic:
        compile_table(doc, source=str(path), base_dir=tmp_path)
    assert error.value.problems == classic.value.problems


@pytest.mark.parametrize(
    "text",
    [
        '{"models": {}, "version": 1}',  # models not last
        '{"version": 1, "version": 1, "models": {}}',  # duplicate section
        '{"version": 1, "models": {"m": {}, "m": {}}}',  # duplicate model
        '{"version": 1, "models": {"m": {}}} x',
        '{"version": 1, "models": {"m": {}}',
    ],
)
def test_unusual_json_is_not_for_the_fast_path(text: str, tmp_path: Path) -> None:
    assert compile_json(text.encode(), digest="", source="t.json", base_dir=tmp_path) is None


def test_compile_source_keeps_the_small_sections(tmp_path: Path) -> None:
    doc = _small()
    table, sections = compile_source(json.dumps(doc).encode(), digest="x", source=str(tmp_path / "t.json"))
    assert list(table.models) == ["m"] and table.digest == "x"
    assert sections == {k: v for k, v in doc.items() if k not in ("models", "api_keys")}
    table2, sections2 = compile_source(yaml.safe_dump(doc).encode(), digest="x", source=str(tmp_path / "t.json"))
    assert table2 == table and sections2 == sections
