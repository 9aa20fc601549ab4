"""Read, validate and compile a routing table document (SPEC §3, §12) into a `Table`.

Three steps, each total:

1. `parse_document` (`document.py`): bytes -> plain data, hardened against hostile files.
2. Validation, before anything is built: the JSON Schema (`schema_gate.py`: structure and unknown
   keys), then the semantic rules (`semantics.py`: references, residency, URLs, CIDRs, ...; value
   syntax in `syntax.py`). Semantic checks skip values whose structure is already reported, so one
   run lists every problem, each as `dotted.path: message` (`problems.py`).
3. Building (`build.py`): frozen dataclasses over read-only mappings, so a compiled `Table` cannot be
   changed.

This module is the facade: the rest of the gateway imports the loader's names from here.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.routing.build import Builder
from gateway.routing.document import MAX_DEPTH, MIN_ALIAS_BUDGET, parse_document
from gateway.routing.model import Table
from gateway.routing.problems import PRODUCTION, RESERVED_ENV, ROOT, DocPath, Problem, TableInvalid, render
from gateway.routing.problems import sort_key as _sort_key  # noqa: F401
from gateway.routing.schema_gate import COLLECTIONS as _COLLECTIONS  # noqa: F401
from gateway.routing.schema_gate import DOC_VALIDATOR as _DOC_VALIDATOR  # noqa: F401
from gateway.routing.schema_gate import GATE as _GATE  # noqa: F401
from gateway.routing.schema_gate import SCHEMA, SCHEMA_PATH, structural_problems
from gateway.routing.schema_gate import explain as _explain  # noqa: F401
from gateway.routing.semantics import Semantics
from gateway.routing.stream import KEYED_SECTIONS, compile_json
from gateway.routing.syntax import (
    SyntaxProblem,
    parse_host_port,
    parse_nameserver,
    parse_network,
    parse_srv_name,
    parse_upstream,
)

__all__ = [
    "MAX_DEPTH",
    "MIN_ALIAS_BUDGET",
    "PRODUCTION",
    "RESERVED_ENV",
    "ROOT",
    "SCHEMA",
    "SCHEMA_PATH",
    "DocPath",
    "Problem",
    "SyntaxProblem",
    "TableInvalid",
    "compile_source",
    "compile_table",
    "load_table",
    "parse_document",
    "parse_host_port",
    "parse_nameserver",
    "parse_network",
    "parse_srv_name",
    "parse_upstream",
    "read_table_file",
    "table_dir",
]

# The loader's internals under their former names (tests/test_table_loader.py reads them).
_structural_problems = structural_problems


def load_table(path: str | os.PathLike[str]) -> Table:
    """Read, validate and compile the table at `path`; raise TableInvalid listing every problem."""
    data, digest = read_table_file(path)
    return compile_source(data, digest=digest, source=os.fspath(path))[0]


def compile_source(data: bytes, *, digest: str, source: str) -> tuple[Table, dict[str, Any]]:
    """Parse and compile a table file's bytes: the Table, and the document's small sections (all
    but `models` and `api_keys`). Raises TableInvalid listing every problem.

    A large valid JSON table is read one model at a time (`stream.py`), so its parsed document is
    never whole in memory; anything else takes the classic path.
    """
    base_dir = table_dir(source)
    with _gc_paused():
        if data.lstrip()[:1] == b"{":
            fast = compile_json(data, digest=digest, source=source, base_dir=base_dir)
            if fast is not None:
                return fast
        doc = parse_document(data, source)
        table = compile_table(doc, digest=digest, source=source, base_dir=base_dir)
        # A valid table: doc is a mapping with every section.
        return table, {key: value for key, value in doc.items() if key not in KEYED_SECTIONS}


def read_table_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The file's bytes and their sha256 hex digest (the table's `digest`)."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise TableInvalid([f"{source}: cannot read the file: {exc.strerror or exc}"]) from None
    return data, hashlib.sha256(data).hexdigest()


def table_dir(source: str) -> Path:
    """Where relative file names in a table (plane `tls` files) are looked up: the table's directory."""
    return Path(os.path.abspath(source)).parent


def compile_table(doc: Any, *, digest: str = "", source: str = "<memory>", base_dir: Path | None = None) -> Table:
    """Validate `doc` completely (structure, then semantics), then build the immutable Table.

    Relative `tls` file paths are resolved against `base_dir` (the table file's directory), or the
    current directory when it is None. Raises TableInvalid with every problem found.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    with _gc_paused():
        try:
            problems = structural_problems(doc)
            problems += Semantics(doc, base).run()
        except RecursionError:
            problems = [((), "the document is nested too deeply or refers to itself")]
        if problems:
            raise TableInvalid(render(problems))
        return Builder(doc, base).table(digest, source)


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a table is compiled (tables may compile on several threads).

    Compiling 100,000 models allocates millions of objects and no garbage cycles; every allocation
    burst would trigger a full collection over the growing heap, which made compiling 2.5x slower.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
