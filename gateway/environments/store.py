"""The admin store: the admin API's changes (the overlay), behind a small interface.

`AdminStore` is what every caller relies on: `load()` the overlay, its `revision()`, and
`save()` as a compare-and-swap on that revision (a write states the revision it was based on and
is refused with `StoreConflict` when the store has moved on), so a database can replace the
file later without touching callers (SPEC §13).

`JsonFileStore` (also `Store`) is the first implementation: one JSON file, embedded on purpose (no
service to run). Each write goes to a temporary file in the same directory, is flushed to disk, and
replaces the store in one rename, so a crash leaves either the old or the new store, never half of
one. The revision check and the rename happen under an exclusive `flock` of the directory, so two
processes pointed at the same store cannot both win one revision.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from gateway.environments.overlay import empty_overlay
from gateway.routing.loader import TableInvalid

FORMAT = 1


class StoreError(Exception):
    """The store could not be written (the admin change is not applied)."""


class StoreConflict(StoreError):
    """The store moved on since the revision a write was based on (nothing was written)."""

    def __init__(self, based_on: int, current: int) -> None:
        super().__init__(f"the admin store is at revision {current}, but this change was based on revision {based_on}")
        self.based_on = based_on
        self.current = current


class AdminStore(Protocol):
    """Where the overlay lives. Revisions count writes: a write based on revision N stores N + 1."""

    def load(self) -> dict[str, Any]:
        """The overlay `{"revision": int, "models": {...}, "api_keys"?: [...]}`; an empty one (revision 0) when nothing is stored."""
        ...

    def revision(self) -> int:
        """The revision stored now (0 when nothing is stored)."""
        ...

    def save(self, overlay: dict[str, Any], based_on: int | None = None) -> None:
        """Store `overlay` if the store is still at `based_on` (default: the overlay's revision - 1).

        Raises `StoreConflict` when it is not, `StoreError` when the write fails; either way nothing changes.
        """
        ...


class JsonFileStore:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<JsonFileStore {self.path}>"

    def load(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return empty_overlay()
        except OSError as exc:
            raise TableInvalid([f"{self.path}: cannot read the admin store: {exc.strerror or exc}"]) from None
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise TableInvalid([f"{self.path}: the admin store is not valid JSON: {exc}"]) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("models"), dict):
            raise TableInvalid([f"{self.path}: not an admin store of format {FORMAT}"])
        overlay = {"revision": int(doc.get("revision", 0)), "models": doc["models"]}
        if isinstance(doc.get("api_keys"), list):
            overlay["api_keys"] = doc["api_keys"]  # the admin-created keys (digests only, `keyset`)
        return overlay

    def revision(self) -> int:
        return int(self.load()["revision"])

    def save(self, overlay: dict[str, Any], based_on: int | None = None) -> None:
        self._store(overlay, int(overlay["revision"]) - 1 if based_on is None else based_on)

    def write(self, overlay: dict[str, Any]) -> None:
        """Store `overlay` whatever is stored now (a copy kept elsewhere, e.g. a fleet gateway's local cache)."""
        self._store(overlay, None)

    def _store(self, overlay: dict[str, Any], expected: int | None) -> None:
        doc = {"format": FORMAT, "revision": overlay["revision"], "models": overlay["models"]}
        if overlay.get("api_keys"):
            doc["api_keys"] = overlay["api_keys"]
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot write the admin store {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # the check and the rename are one step for every process
            if expected is not None:
                self._check(expected)
            self._replace(data, directory)
            os.fsync(dir_fd)  # the rename itself survives a power cut
        except OSError as exc:
            raise StoreError(f"cannot write the admin store {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(dir_fd)  # also releases the lock

    def _check(self, expected: int) -> None:
        try:
            current = self.revision()
        except TableInvalid as exc:
            raise StoreError(f"cannot write the admin store: {exc.problems[0]}") from None
        if current != expected:
            raise StoreConflict(expected, current)

    def _replace(self, data: bytes, directory: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


Store = JsonFileStore  # the name `TableState` and `load_serving_table` use
