"""The admin store: the admin API's changes (the overlay), one JSON file written atomically.

Embedded on purpose: no service to run. Each write goes to a temporary file in the same
directory, is flushed to disk, and replaces the store in one rename, so a crash leaves either
the old or the new store, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gateway.environments.overlay import empty_overlay
from gateway.routing.loader import TableInvalid

FORMAT = 1


class StoreError(Exception):
    """The store could not be written (the admin change is not applied)."""


class Store:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    def load(self) -> dict[str, Any]:
        """The overlay in the store; an empty one when there is no store yet."""
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
        return {"revision": int(doc.get("revision", 0)), "models": doc["models"]}

    def save(self, overlay: dict[str, Any]) -> None:
        doc = {"format": FORMAT, "revision": overlay["revision"], "models": overlay["models"]}
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        try:
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
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write the admin store {self.path}: {exc.strerror or exc}") from None
