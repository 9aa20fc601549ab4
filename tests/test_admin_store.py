"""The admin store's interface and its compare-and-swap on `admin_revision` (SPEC §6 "survive a restart", §13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.environments.store import AdminStore, JsonFileStore, StoreConflict, StoreError


def overlay(revision: int, **models: Any) -> dict[str, Any]:
    return {"revision": revision, "models": models}


def test_a_write_based_on_the_current_revision_wins(tmp_path: Path) -> None:
    store: AdminStore = JsonFileStore(str(tmp_path / "s.json"))
    assert store.revision() == 0
    store.save(overlay(1, m={"deployments": {"v1": {"status": "inactive"}}}), based_on=0)
    store.save(overlay(2), based_on=1)
    assert store.revision() == 2 and store.load() == overlay(2)
    store.save(overlay(3))  # based on its own revision - 1 when not stated (what TableState.apply relies on)
    assert store.revision() == 3


@pytest.mark.parametrize(("stored", "based_on"), [(0, 1), (2, 0), (2, 1), (2, 3)])
def test_a_write_based_on_another_revision_is_refused_and_changes_nothing(
    tmp_path: Path, stored: int, based_on: int
) -> None:
    store = JsonFileStore(str(tmp_path / "s.json"))
    for revision in range(1, stored + 1):
        store.save(overlay(revision, m={"n": revision}))
    before = (tmp_path / "s.json").read_bytes() if stored else None
    with pytest.raises(StoreConflict) as caught:
        store.save(overlay(based_on + 1, m={"n": "mine"}), based_on=based_on)
    assert (caught.value.based_on, caught.value.current) == (based_on, stored)
    assert (
        str(caught.value)
        == f"the admin store is at revision {stored}, but this change was based on revision {based_on}"
    )
    assert (tmp_path / "s.json").read_bytes() == before if stored else not (tmp_path / "s.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["s.json"] if stored else [])  # no temporary file left


def test_two_writers_of_one_store_cannot_both_win_a_revision(tmp_path: Path) -> None:
    first, second = JsonFileStore(str(tmp_path / "s.json")), JsonFileStore(str(tmp_path / "s.json"))
    based_on = first.revision()
    assert based_on == second.revision() == 0
    first.save(overlay(1, a={}), based_on=based_on)
    with pytest.raises(StoreConflict):
        second.save(overlay(1, b={}), based_on=based_on)
    assert first.load() == second.load() == overlay(1, a={})


def test_a_damaged_store_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON") as caught:
        JsonFileStore(str(tmp_path / "s.json")).save(overlay(1))
    assert not isinstance(caught.value, StoreConflict)
    assert (tmp_path / "s.json").read_text() == "{not json"
