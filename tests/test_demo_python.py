"""`gateway demo --python`: the printed Python script runs against the running demo as printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.demo.pycalls import BEGIN, END
from tests.support import REPO, example_doc, free_port, interrupt, write_table


def test_the_printed_python_calls_work_against_the_demo(tmp_path: Path) -> None:
    doc = example_doc(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    config = write_table(tmp_path / "demo.yaml", doc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--python", "--config", str(config), "--port", str(free_port()),
         "--admin-port", str(free_port()), "--grpc-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # bounded: the demo prints the script once, then waits
            lines.append(line.rstrip("\n"))
            if line.startswith(END):
                break
        script = "\n".join(lines[lines.index(BEGIN) :])
        assert ".localhost:" not in script  # no URL a Python client would have to resolve
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == [
            "regional 200 us", "standard 200 eu", "streamed 200 4 events", "urllib 200 production"
        ]  # fmt: skip
    finally:
        interrupt(proc)
