"""The overlay of admin changes on the table file, and the rollback window: pure, no servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.environments.overlay import compose, composed_digest, empty_overlay, orphans, patch_model, read_base
from gateway.environments.promotion import RollbackWindow, promote_options
from gateway.environments.store import Store
from gateway.errors import ClientError
from gateway.routing.loader import TableInvalid
from gateway.routing.resolve import Call, resolve
from tests.support import DEMO_KEY, EXAMPLE, example_doc, write_table


@pytest.fixture
def base(tmp_path: Path):  # noqa: ANN201
    path = write_table(tmp_path / "t.yaml", example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002"))
    return read_base(str(path))


def overlay(**models: dict) -> dict:
    return {"revision": 1, "models": models}


def test_an_empty_overlay_serves_the_file_as_it_is(base) -> None:  # noqa: ANN001
    assert compose(base, empty_overlay()) is base.table


def test_patch_model_never_modifies_the_files_document(base) -> None:  # noqa: ANN001
    before = repr(base.doc["models"]["abc123"])
    patched = patch_model(base.doc["models"]["abc123"], {
        "deployments": {"v2": {"status": "inactive"}},
        "environments": {"staging": {"set": {"canary": None, "deployment": "v2"}}, "production": {"deleted": True}},
    })  # fmt: skip
    assert repr(base.doc["models"]["abc123"]) == before
    assert patched["deployments"]["v2"]["status"] == "inactive"
    assert patched["environments"]["staging"] == {"deployment": "v2", "autoscaling": {
        "min_replica": 0, "max_replica": 3, "concurrency_target": 4}}  # fmt: skip
    assert "production" not in patched["environments"] and "production" in patched["deleted_environments"]


def test_compose_changes_only_the_touched_models(base) -> None:  # noqa: ANN001
    table = compose(base, overlay(abc123={"environments": {"staging": {"set": {"deployment": "v2", "canary": None}}}}))
    staging = table.models["abc123"].environments["staging"]
    assert staging.deployment is not None and staging.deployment.id == "v2" and staging.canary is None
    assert table.models["llm7"] is base.table.models["llm7"]
    assert table.digest != base.digest and table.digest == composed_digest(base.digest, {
        "abc123": {"environments": {"staging": {"set": {"deployment": "v2", "canary": None}}}}})  # fmt: skip
    assert table.api_keys is base.table.api_keys


def test_a_created_environment_replaces_the_files_entry_and_leaves_the_deleted_list(base) -> None:  # noqa: ANN001
    table = compose(base, overlay(abc123={"environments": {
        "staging": {"replace": True, "set": {}}, "old-staging": {"replace": True, "set": {}}}}))  # fmt: skip
    model = table.models["abc123"]
    assert model.environments["staging"].deployment is None and model.environments["staging"].canary is None
    assert "old-staging" in model.environments and "old-staging" not in model.deleted_environments


def test_overlay_problems_are_reported_by_path_and_nothing_is_skipped(base) -> None:  # noqa: ANN001
    with pytest.raises(TableInvalid) as info:
        compose(base, overlay(abc123={"environments": {
            "prod-us": {"set": {"deployment": "v3"}},
            "staging": {"set": {"canary": {"deployment": "v9", "percent": 5}}}}}))  # fmt: skip
    problems = info.value.problems
    assert any("models.abc123.environments.prod-us.deployment" in p and "pinned to region 'us'" in p for p in problems)
    assert any("models.abc123.environments.staging.canary.deployment: unknown deployment 'v9'" in p for p in problems)
    assert all(p.startswith("with the admin API's changes: ") for p in problems)


def test_a_ramping_promotion_becomes_the_environments_candidate_split(base) -> None:  # noqa: ANN001
    promotion = {"status": "RAMPING_UP", "deployment_id": "v2", "percent": 30}
    table = compose(base, overlay(abc123={"environments": {"production": {"set": {}, "promotion": promotion}}}))
    env = table.models["abc123"].environments["production"]
    assert env.candidate is not None and env.candidate.deployment.id == "v2" and env.candidate.percent == 30
    sides = {
        resolve(
            table,
            Call("POST", "model-abc123.api.example.com", "/production/predict", f"Api-Key {DEMO_KEY}", f"user-{i}"),
        ).side  # fmt: skip
        for i in range(200)
    }
    assert sides == {"primary", "candidate"}
    for status in ("RELEASING", "SUCCEEDED", "FAILED", "CANCELED"):
        done = compose(
            base, overlay(abc123={"environments": {"production": {"promotion": dict(promotion, status=status)}}})
        )
        assert done.models["abc123"].environments["production"].candidate is None


def test_a_candidate_outside_the_environments_region_is_refused(base) -> None:  # noqa: ANN001
    promotion = {"status": "PAUSED", "deployment_id": "v3", "percent": 10}
    with pytest.raises(TableInvalid, match="pinned to region 'us'"):
        compose(base, overlay(abc123={"environments": {"prod-us": {"promotion": promotion}}}))


def test_changes_to_a_model_the_file_dropped_wait_unused(base) -> None:  # noqa: ANN001
    changes = overlay(gone1={"environments": {"production": {"deleted": True}}})
    assert compose(base, changes) is base.table
    assert orphans(base, changes) == ["gone1"]


def test_read_base_reuses_an_unchanged_file(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.yaml", example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002"))
    first = read_base(str(path))
    assert read_base(str(path), first) is first
    path.write_text(path.read_text() + "\n# changed\n")
    assert read_base(str(path), first) is not first
    assert read_base(str(EXAMPLE)).table.models.keys() == first.table.models.keys()


def test_the_store_round_trips_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.json"))
    assert store.load() == empty_overlay()
    data = overlay(m={"environments": {"e": {"deleted": True}}})
    store.save(data)
    assert store.load() == data
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left behind
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(TableInvalid, match="not valid JSON"):
        store.load()


def test_the_rollback_window_slides() -> None:
    window = RollbackWindow({"max_5xx_percent": 10, "window_seconds": 10, "min_calls": 20})
    assert window.check((0, 0), now=0) is None
    assert window.check((15, 15), now=1) is None  # under min_calls
    message = window.check((30, 16), now=2)
    assert message is not None and "53.3% 5xx" in message and "16 of 30" in message
    # Old failures leave the window: only the last 10 s count.
    window = RollbackWindow({"max_5xx_percent": 10, "window_seconds": 10, "min_calls": 20})
    window.check((0, 0), now=0)
    window.check((20, 10), now=1)  # (would fail here)
    assert window.check((20, 10), now=12) is None  # baseline moved: no calls in the window
    assert window.check((120, 12), now=13) is None  # 2 of 100 = 2%
    assert window.check((160, 20), now=14) is None  # 10 of 140 since the baseline (20, 10): 7.1%
    assert window.check((170, 30), now=15) is not None  # 20 of 150: 13.3%
    assert RollbackWindow(None).check((100, 100)) is None


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, "deployment_id"),
        ({"deployment_id": 3}, "deployment_id"),
        ({"deployment_id": "v", "ramp_up_duration_seconds": True}, "ramp_up_duration_seconds"),
        ({"deployment_id": "v", "ramp_up_duration_seconds": float("nan")}, "ramp_up_duration_seconds"),
        ({"deployment_id": "v", "smoke_check": {"path": "/p", "expected_status": 99}}, "expected_status"),
        ({"deployment_id": "v", "smoke_check": {"path": "/p", "verb": "GET"}}, "smoke_check.verb"),
        ({"deployment_id": "v", "ramp_up_duration_seconds": 5, "rollback": {"window_seconds": 5}}, "max_5xx"),
        ({"deployment_id": "v", "ramp_up_duration_seconds": 5,
          "rollback": {"max_5xx_percent": 5, "window_seconds": 5, "min_calls": 0}}, "min_calls"),
    ],
)  # fmt: skip
def test_promote_options_are_checked(body: dict, text: str) -> None:
    with pytest.raises(ClientError, match=text):
        promote_options(body)
