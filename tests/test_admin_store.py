"""The admin store's interface and its compare-and-swap on `admin_revision` (SPEC §6 "survive a restart", §13)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.environments.changes import env_change
from gateway.environments.overlay import empty_overlay
from gateway.environments.store import AdminStore, JsonFileStore, StoreConflict, StoreError
from gateway.environments.writer import AdminWriter
from gateway.errors import Conflict, InternalError, InvalidChange
from gateway.metrics import Metrics
from gateway.state import TableState
from tests.support import example_doc, write_table


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


class MemoryStore:
    """A second `AdminStore`: what a database-backed store looks like to the callers."""

    def __init__(self) -> None:
        self.doc = empty_overlay()
        self.saves = 0

    def load(self) -> dict[str, Any]:
        return copy.deepcopy(self.doc)

    def revision(self) -> int:
        return int(self.doc["revision"])

    def save(self, overlay: dict[str, Any], based_on: int | None = None) -> None:
        expected = overlay["revision"] - 1 if based_on is None else based_on
        if expected != self.revision():
            raise StoreConflict(expected, self.revision())
        self.doc = copy.deepcopy(overlay)
        self.saves += 1


def _state(tmp_path: Path) -> TableState:
    table = write_table(tmp_path / "t.yaml", example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002"))
    return TableState(str(table), Metrics())


def _canary(percent: int) -> Any:
    return lambda o: env_change(o, "abc123", "production")["set"].update(
        canary={"deployment": "v2", "percent": percent}
    )


def test_the_writer_states_its_revision_and_a_moved_store_is_a_409(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = _state(tmp_path)
        writer = AdminWriter(state)
        await writer.change("one", _canary(10))
        assert writer.revision == 1 and state.store.revision() == 1
        # Someone else (another gateway on the same store) writes revision 2 meanwhile.
        other = JsonFileStore(str(state.store.path))
        theirs = other.load()
        env_change(theirs, "abc123", "production")["set"]["canary"] = {"deployment": "v2", "percent": 30}
        other.save({**theirs, "revision": 2}, based_on=1)
        with pytest.raises(Conflict) as caught:
            await writer.change("two", _canary(20))
        assert caught.value.status == 409 and caught.value.error_code == "client_error"
        assert "the admin store is at revision 2, but this change was based on revision 1" in caught.value.message
        assert json.loads(state.store.path.read_text())["revision"] == 2  # theirs stands
        # The refusal read the store again: the table serves their change, and a retry is based on it.
        assert writer.revision == 2 and state.table.models["abc123"].environments["production"].canary.percent == 30
        await writer.change("two, again", _canary(20))
        assert state.store.revision() == 3
        assert state.table.models["abc123"].environments["production"].canary.percent == 20

    asyncio.run(scenario())


def test_the_writer_works_over_any_admin_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = _state(tmp_path)
        state.store = MemoryStore()  # type: ignore[assignment]  # TableState makes a JsonFileStore itself
        writer = AdminWriter(state)
        await writer.change("one", _canary(10))
        await writer.change("two", _canary(20))
        assert state.store.saves == 2 and state.store.revision() == 2  # type: ignore[attr-defined]
        state.store.doc["revision"] = 5  # type: ignore[attr-defined]  # the database moved on
        with pytest.raises(Conflict):
            await writer.change("three", _canary(30))

    asyncio.run(scenario())


def test_the_writer_refuses_a_change_that_breaks_the_table_or_cannot_be_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = _state(tmp_path)
        writer = AdminWriter(state)
        before = (state.table.digest, writer.revision)
        with pytest.raises(InvalidChange, match="unknown deployment 'v9'"):
            await writer.change("bad", lambda o: env_change(o, "abc123", "production")["set"].update(deployment="v9"))
        state.store.path.write_text("{broken")
        with pytest.raises(InternalError, match="not valid JSON"):
            await writer.change("unstorable", _canary(10))
        assert (state.table.digest, writer.revision) == before

    asyncio.run(scenario())
