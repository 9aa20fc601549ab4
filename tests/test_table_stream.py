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


# -- models written alike are checked once and copied (`stream._checked_model`, `Builder.clone_model`) --


def _alike(n: int) -> dict:
    doc = _small()
    doc["planes"]["p"]["health_check"] = {"path": "/ok"}
    model = {
        "team": "t",
        "kind": "chain",
        "deployments": {
            "v1": {"plane": "p", "endpoints": ["http://10.0.0.1:80", "http://10.0.0.2:80"]},
            "v2": {"plane": "p", "status": "scaled_to_zero"},
            "dev": {"plane": "p", "development": True},
        },
        "environments": {
            "production": {"deployment": "v1", "shadow": {"deployment": "v2", "percent": 5}},
            "staging": {"deployment": "v1", "canary": {"deployment": "v2", "percent": 10}},
            "later": {},
        },
        "deleted_environments": ["old"],
    }
    doc["models"] = {f"m{i}": copy.deepcopy(model) for i in range(n)}
    doc["api_keys"][0]["models"] = ["m0"]
    if n > 3:
        doc["models"]["m3"]["environments"]["staging"]["canary"]["percent"] = 20  # one text of its own
    return doc


def test_models_written_alike_build_the_classic_table(tmp_path: Path) -> None:
    doc = _alike(6)
    fast = compile_json(json.dumps(doc).encode(), digest="d", source="t.json", base_dir=tmp_path)
    assert fast is not None
    table = fast[0]
    assert table == compile_table(doc, digest="d", source="t.json", base_dir=tmp_path)
    for model_id, model in table.models.items():
        assert model.id == model_id
        deployments = model.deployments
        assert all(dep.model_id == model_id for dep in deployments.values())
        assert model.development is deployments["dev"]
        staging, production = model.environments["staging"], model.environments["production"]
        assert staging.deployment is deployments["v1"] and staging.canary.deployment is deployments["v2"]
        assert production.shadow.deployment is deployments["v2"]
    assert table.models["m3"].environments["staging"].canary.percent == 20
    assert table.models["m4"].environments["staging"].canary.percent == 10


def test_a_copied_model_shares_its_settings_not_its_deployments(tmp_path: Path) -> None:
    table = compile_json(json.dumps(_alike(3)).encode(), digest="d", source="t.json", base_dir=tmp_path)[0]
    first, second = table.models["m0"], table.models["m1"]
    assert first.deployments["v1"] is not second.deployments["v1"]
    assert first.deployments["v1"].endpoints is second.deployments["v1"].endpoints
    assert first.environments["staging"].autoscaling is second.environments["staging"].autoscaling


def test_a_problem_in_models_written_alike_is_reported_for_each(tmp_path: Path) -> None:
    doc = _alike(4)
    for model in doc["models"].values():
        model["environments"]["staging"]["deployment"] = "v9"
    data = json.dumps(doc).encode()
    assert compile_json(data, digest="", source="t.json", base_dir=tmp_path) is None
    path = tmp_path / "t.json"
    path.write_bytes(data)
    with pytest.raises(TableInvalid) as error:
        load_table(path)
    assert sum("unknown deployment 'v9'" in p for p in error.value.problems) == 4


def test_a_duplicate_key_inside_models_written_alike_is_not_for_the_fast_path(tmp_path: Path) -> None:
    text = json.dumps(_alike(3)).replace('"kind": "chain"', '"kind": "chain", "kind": "model"')
    assert compile_json(text.encode(), digest="", source="t.json", base_dir=tmp_path) is None


def test_past_the_template_limit_models_are_checked_one_by_one(tmp_path: Path, monkeypatch) -> None:
    from gateway.routing import stream

    monkeypatch.setattr(stream, "_TEMPLATES", 1)
    doc = _alike(6)
    fast = compile_json(json.dumps(doc).encode(), digest="d", source="t.json", base_dir=tmp_path)
    assert fast is not None and fast[0] == compile_table(doc, digest="d", source="t.json", base_dir=tmp_path)
